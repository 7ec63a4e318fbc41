"""A user's own converter, named by import path (data.format: tests.data.user_format:convert)."""

from vlrlhf.data.records import Message, PreferencePair


def convert(row, context):
    return [PreferencePair(prompt=[Message(role="user", content=row["q"])], chosen=row["good"], rejected=row["bad"])]
