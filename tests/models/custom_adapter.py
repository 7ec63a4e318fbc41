"""A user's own adapter, named by import path in tests (model.adapter: ...)."""

from vlrlhf.models.llava import LlavaAdapter


class ShoutingLlavaAdapter(LlavaAdapter):
    """LLaVA with user turns upper-cased: enough to tell it was the one used."""

    def render(self, messages, add_generation_prompt):
        shouted = [dict(m, content=m["content"].upper().replace("<IMAGE>", "<image>"))
                   if m["role"] == "user" else m for m in messages]
        return super().render(shouted, add_generation_prompt)


NOT_AN_ADAPTER = object()
