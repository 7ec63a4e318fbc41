"""Chat templates of the tiny checkpoints, written after each family's public format.

Real checkpoints bring their own template in their processor; these exist so the
tiny models render conversations the way their families do. Every template takes
`content` as a string or as a list of `{"type": "text"|"image"}` parts, and keeps
the property the encoder relies on: the rendering of the first k messages (with
the generation prompt) is a string prefix of the rendering of all messages.
"""

# Turns a message's content into a list of parts, whichever form it came in.
_PARTS = (
    "{%- if message['content'] is string -%}"
    "{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
)


def _render_parts(image: str) -> str:
    return ("{%- for part in parts -%}{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
            "{%- else -%}{{ part['text'] }}{%- endif -%}{%- endfor -%}")


# LLaVA-1.5 (Vicuna v1): "USER: <image>\nQ ASSISTANT: A</s>"
LLAVA_15 = (
    "{%- for message in messages -%}" + _PARTS +
    "{%- if message['role'] == 'system' -%}" + _render_parts("") + "{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}" + _render_parts("<image>\\n") + "{{ ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}" + _render_parts("") + "{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# LLaVA-NeXT (Mistral instruct): "<s>[INST] <image>\nQ [/INST] A</s>"
MISTRAL_INST = (
    "{{ bos_token }}{%- for message in messages -%}" + _PARTS +
    "{%- if message['role'] == 'system' -%}" + _render_parts("") + "{{ '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' }}" + _render_parts("<image>\\n") + "{{ ' [/INST]' }}"
    "{%- else -%}{{ ' ' }}" + _render_parts("") + "{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)

# Qwen2-VL / Qwen2.5-VL (ChatML with vision markers and a default system turn).
CHATML_QWEN = (
    "{%- for message in messages -%}" + _PARTS +
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _render_parts("<|vision_start|><|image_pad|><|vision_end|>") +
    "{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Idefics3 / SmolVLM: "<|im_start|>User:<image>Q<end_of_utterance>\nAssistant: A<end_of_utterance>\n"
IDEFICS3 = (
    "{{ bos_token }}{%- for message in messages -%}" + _PARTS +
    "{{ message['role'] | capitalize }}"
    "{%- if parts[0]['type'] == 'image' -%}{{ ':' }}{%- else -%}{{ ': ' }}{%- endif -%}"
    + _render_parts("<image>") +
    "{{ '<end_of_utterance>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)

# LLaVA-OneVision (Qwen2 ChatML, "<image>" placeholders, no default system turn):
# "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
CHATML_ONEVISION = (
    "{%- for message in messages -%}" + _PARTS +
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _render_parts("<image>\\n") +
    "{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# InternVL (ChatML; "<IMG_CONTEXT>" per image, which the processor wraps in <img>...</img>
# and repeats per tile): "<|im_start|>user\n<IMG_CONTEXT>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
CHATML_INTERNVL = (
    "{%- for message in messages -%}" + _PARTS +
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + _render_parts("<IMG_CONTEXT>\\n") +
    "{{ '<|im_end|>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# GLM-4.1V (role tokens; an image is <|begin_of_image|><|image|><|end_of_image|>, the
# processor repeats <|image|>; an answer ends with <|endoftext|> in these tiny checkpoints):
# "[gMASK]<sop><|user|>\nQ<|assistant|>\nA<|endoftext|>"
GLM4V = (
    "{{ '[gMASK]<sop>' }}{%- for message in messages -%}" + _PARTS +
    "{{ '<|' + message['role'] + '|>\\n' }}"
    + _render_parts("<|begin_of_image|><|image|><|end_of_image|>") +
    "{%- if message['role'] == 'assistant' -%}{{ '<|endoftext|>' }}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

# Gemma 3: "<bos><start_of_turn>user\n<start_of_image>Q<end_of_turn>\n<start_of_turn>model\nA<end_of_turn>\n"
# (the processor expands <start_of_image> into the image's soft tokens between blank lines)
GEMMA3 = (
    "{{ '<bos>' }}{%- for message in messages -%}" + _PARTS +
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    + _render_parts("<start_of_image>") +
    "{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
