"""LLaMA-Factory template names, accepted when they render exactly as the base's chat template.

loradock always renders training prompts with the base model's own chat template, so
training sees what serving will use. A LLaMA-Factory config names its prompt format
instead (`template: qwen3_nothink`); that name is accepted when LLaMA-Factory's
template renders conversations character for character as the base's template does,
so the run trains on what `llamafactory-cli train` would have trained on. Otherwise
the error names the templates that do fit this base.

The definitions below are transcribed from LLaMA-Factory's
`src/llamafactory/data/template.py` (Apache-2.0): for each template its prefix,
system, user and assistant formats, default system prompt, and the class behaviour
that changes the text (Llama2Template folds the system prompt into the first user
turn; ReasoningTemplate, with thinking enabled as by default, puts an empty
`<think>` block before every answer; efficient_eos templates end the sequence with
the eos token instead of closing each answer with it). Tool, observation and
multimodal formats are left out: loradock trains on system, user and assistant turns.

Only conversations the base's template can train on are compared: one that it
refuses to render (e.g. a system message for Gemma 2) or renders differently from
its own prefixes (the Qwen3 hybrid template rewrites earlier answers) is refused by
the trainer anyway, so it cannot make a template differ.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from jinja2 import TemplateError

from .config import TEMPLATE_ALIASES
from .datasets import Conversation
from .errors import ConfigError, DatasetError
from .templates import render_with_spans

CONTENT = "{{content}}"
BOS, EOS = "\x00bos\x00", "\x00eos\x00"  # LLaMA-Factory's {"bos_token"} / {"eos_token"} slots
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"


@dataclass(frozen=True)
class LFTemplate:
    """The text-shaping part of one LLaMA-Factory template (`{{content}}` marks the message)."""

    user: str = CONTENT
    assistant: str = CONTENT + EOS
    system: str = CONTENT
    prefix: str = ""
    default_system: str = ""
    eos: str | None = None  # replace_eos: the eos slot renders as the first stop word
    fuse_system: bool = False  # Llama2Template
    empty_thought: bool = False  # ReasoningTemplate with enable_thinking (LLaMA-Factory's default)
    efficient_eos: bool = False  # answers end bare; the sequence ends with eos


def _chatml(default_system: str = "", eos: str | None = None, thought: bool = False) -> LFTemplate:
    return LFTemplate(
        user="<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
        assistant="{{content}}<|im_end|>\n",
        system="<|im_start|>system\n{{content}}<|im_end|>\n",
        default_system=default_system, eos=eos, empty_thought=thought,
    )


_GEMMA_TURNS = {
    "user": "<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
    "assistant": "{{content}}<end_of_turn>\n",
    "system": "{{content}}\n\n",
    "prefix": BOS,
    "fuse_system": True,
}

_LLAMA3 = LFTemplate(
    user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    assistant="{{content}}<|eot_id|>",
    system="<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
    prefix=BOS, eos="<|eot_id|>",
)

TEMPLATES: dict[str, LFTemplate] = {
    "alpaca": LFTemplate(
        user="### Instruction:\n{{content}}\n\n### Response:\n",
        assistant="{{content}}" + EOS + "\n\n",
        default_system=("Below is an instruction that describes a task. Write a response that "
                        "appropriately completes the request.\n\n"),
    ),
    "chatml": _chatml(eos="<|im_end|>"),
    "cohere": LFTemplate(
        user=("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>"
              "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
        system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{{content}}<|END_OF_TURN_TOKEN|>",
        prefix=BOS,
    ),
    "deepseek": LFTemplate(user="User: {{content}}\n\nAssistant:", system="{{content}}\n\n", prefix=BOS),
    "deepseek3": LFTemplate(user="<｜User｜>{{content}}<｜Assistant｜>", prefix=BOS),
    "deepseekr1": LFTemplate(user="<｜User｜>{{content}}<｜Assistant｜>", prefix=BOS, empty_thought=True),
    "empty": LFTemplate(assistant=CONTENT),
    "falcon": LFTemplate(user="User: {{content}}\nFalcon:", assistant="{{content}}\n", efficient_eos=True),
    "gemma": LFTemplate(**_GEMMA_TURNS, eos="<end_of_turn>"),
    "gemma2": LFTemplate(**_GEMMA_TURNS, efficient_eos=True),
    "gemma3": LFTemplate(**_GEMMA_TURNS, eos="<end_of_turn>"),
    "glm4": LFTemplate(
        user="<|user|>\n{{content}}<|assistant|>", assistant="\n{{content}}",
        system="<|system|>\n{{content}}", prefix="[gMASK]<sop>", efficient_eos=True,
    ),
    "granite3": LFTemplate(
        user=("<|start_of_role|>user<|end_of_role|>{{content}}<|end_of_text|>\n"
              "<|start_of_role|>assistant<|end_of_role|>"),
        assistant="{{content}}<|end_of_text|>\n",
        system="<|start_of_role|>system<|end_of_role|>{{content}}<|end_of_text|>\n",
    ),
    "lfm2": _chatml(default_system="You are a helpful AI assistant.", eos="<|im_end|>"),
    "llama2": LFTemplate(
        user=BOS + "[INST] {{content}} [/INST]", system="<<SYS>>\n{{content}}\n<</SYS>>\n\n", fuse_system=True,
    ),
    "llama3": _LLAMA3,
    "llama4": LFTemplate(
        user="<|header_start|>user<|header_end|>\n\n{{content}}<|eot|><|header_start|>assistant<|header_end|>\n\n",
        assistant="{{content}}<|eot|>",
        system="<|header_start|>system<|header_end|>\n\n{{content}}<|eot|>",
        prefix=BOS, eos="<|eot|>",
    ),
    "ministral": LFTemplate(user="[INST]{{content}}[/INST]", system="{{content}}\n\n", prefix=BOS, fuse_system=True),
    "mistral": LFTemplate(
        user="[INST] {{content}}[/INST]", assistant=" {{content}}" + EOS, system="{{content}}\n\n",
        prefix=BOS, fuse_system=True,
    ),
    "mistral_small": LFTemplate(
        user="[INST]{{content}}[/INST]", system="[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]", prefix=BOS,
    ),
    "olmo": LFTemplate(user="<|user|>\n{{content}}<|assistant|>\n", prefix=EOS),
    "openchat": LFTemplate(user="GPT4 Correct User: {{content}}" + EOS + "GPT4 Correct Assistant:", prefix=BOS),
    "phi": LFTemplate(
        user="<|user|>\n{{content}}<|end|>\n<|assistant|>\n", assistant="{{content}}<|end|>\n",
        system="<|system|>\n{{content}}<|end|>\n", eos="<|end|>",
    ),
    "phi4": LFTemplate(
        user="<|im_start|>user<|im_sep|>{{content}}<|im_end|><|im_start|>assistant<|im_sep|>",
        assistant="{{content}}<|im_end|>", system="<|im_start|>system<|im_sep|>{{content}}<|im_end|>",
        eos="<|im_end|>",
    ),
    "qwen": _chatml(default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                    eos="<|im_end|>"),
    "qwen3": _chatml(eos="<|im_end|>", thought=True),
    "qwen3_nothink": _chatml(eos="<|im_end|>"),
    "qwen3_5": _chatml(eos="<|im_end|>", thought=True),
    "qwen3_5_nothink": _chatml(eos="<|im_end|>"),
    "smollm": _chatml(),
    "smollm2": _chatml(default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face."),
    "solar": LFTemplate(user="### User:\n{{content}}\n\n### Assistant:\n", system="### System:\n{{content}}\n\n",
                        efficient_eos=True),
    "starchat": LFTemplate(
        user="<|user|>\n{{content}}<|end|>\n<|assistant|>", assistant="{{content}}<|end|>\n",
        system="<|system|>\n{{content}}<|end|>\n",
    ),
    "vicuna": LFTemplate(
        user="USER: {{content}} ASSISTANT:",
        default_system=("A chat between a curious user and an artificial intelligence assistant. "
                        "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    ),
    "yi": _chatml(),
    "zephyr": LFTemplate(
        user="<|user|>\n{{content}}" + EOS + "<|assistant|>\n", system="<|system|>\n{{content}}" + EOS,
        default_system="You are Zephyr, a helpful assistant.",
    ),
}
# LLaMA-Factory's own `default` template ("Human: ... Assistant:") is not offered: in loradock
# `template: default` means the base model's own chat template.

_SYSTEM = {"role": "system", "content": "Answer in one short sentence."}
_TURN_1 = [{"role": "user", "content": "What colour is the sky?"}, {"role": "assistant", "content": "It is blue."}]
_TURN_2 = [{"role": "user", "content": "And grass?"}, {"role": "assistant", "content": "Grass is green."}]
PROBES: tuple[tuple[str, Conversation], ...] = (
    ("one turn with a system message", [_SYSTEM, *_TURN_1]),
    ("one turn without a system message", _TURN_1),
    ("two turns with a system message", [_SYSTEM, *_TURN_1, *_TURN_2]),
    ("two turns without a system message", [*_TURN_1, *_TURN_2]),
)


def render(template: LFTemplate, conversation: Conversation, bos: str | None, eos: str | None) -> str:
    """The text LLaMA-Factory's template makes of a conversation (its `_encode`, as text)."""
    system, turns = "", conversation
    if conversation and conversation[0]["role"] == "system":
        system, turns = conversation[0]["content"], conversation[1:]
    system = system or template.default_system
    pieces = []
    for i, message in enumerate(turns):
        content = message["content"]
        if i == 0:
            pieces.append(template.prefix)
            if system and not template.fuse_system:
                pieces.append(_fill(template.system, system))
            elif system:
                content = _fill(template.system, system) + content
        if message["role"] == "user":
            pieces.append(_fill(template.user, content))
        else:
            if template.empty_thought and "<think>" not in content and "</think>" not in content:
                content = EMPTY_THOUGHT + content
            pieces.append(_fill(template.assistant, content))
    if template.efficient_eos:
        pieces.append(EOS)
    eos_text = template.eos if template.eos is not None else eos
    return "".join(pieces).replace(BOS, bos or "").replace(EOS, eos_text or "")


def base_renderings(tokenizer) -> list[tuple[str, Conversation, str]]:
    """(probe name, conversation, text) for each probe the base's chat template can train on."""
    out = []
    for what, conversation in PROBES:
        try:
            text, _spans = render_with_spans(tokenizer, conversation)
        except DatasetError:
            continue  # no chat template, or one that rewrites earlier turns: the trainer refuses it
        except TemplateError:  # the template's raise_exception, e.g. "System role not supported"
            continue
        out.append((what, conversation, text))
    return out


def difference(name: str, tokenizer, renderings: list[tuple[str, Conversation, str]]) -> str | None:
    """None when template `name` renders every probe as the base does, else where it first differs."""
    template = TEMPLATES[name]
    for what, conversation, expected in renderings:
        got = render(template, conversation, tokenizer.bos_token, tokenizer.eos_token)
        # Trailing whitespace after the last answer is no part of the format (and is never learned).
        if got.rstrip() != expected.rstrip():
            at = next((i for i, (a, b) in enumerate(zip(expected, got, strict=False)) if a != b),
                      min(len(expected), len(got)))
            return (f"for {what}, at character {at}: the base's template writes "
                    f"{_excerpt(expected, at)}, {name} writes {_excerpt(got, at)}")
    return None


def fitting_templates(tokenizer) -> list[str]:
    """Every LLaMA-Factory template loradock knows that renders like this base's chat template."""
    renderings = base_renderings(tokenizer)
    if not renderings:
        return []
    return [name for name in TEMPLATES if difference(name, tokenizer, renderings) is None]


def check_template(name: str | None, tokenizer) -> None:
    """Accept the base's own template, or a LLaMA-Factory template that renders exactly like it."""
    if name is None or name in TEMPLATE_ALIASES:
        return
    fits = fitting_templates(tokenizer)
    default = "template: default (loradock always trains with the base's own chat template)"
    advice = (f"LLaMA-Factory templates that fit this base: {', '.join(fits)}; or use {default}" if fits
              else f"None of the {len(TEMPLATES)} LLaMA-Factory templates loradock knows fits this base; "
                   f"use {default}")
    if name not in TEMPLATES:
        close = difflib.get_close_matches(name, list(TEMPLATES), n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"template: {name!r} is not a LLaMA-Factory template loradock knows{hint}. {advice}")
    renderings = base_renderings(tokenizer)
    if not renderings:
        raise ConfigError(
            f"template: {name!r} cannot be checked: the base model's chat template renders none of "
            "loradock's test conversations (system, user and assistant turns). Use template: default"
        )
    diff = difference(name, tokenizer, renderings)
    if diff is not None:
        raise ConfigError(
            f"template: {name!r} does not render conversations as the base model's own chat "
            f"template does ({diff}). {advice}"
        )


def _fill(slot: str, content: str) -> str:
    return slot.replace(CONTENT, content)


def _excerpt(text: str, at: int, width: int = 24) -> str:
    start = max(0, at - 8)
    piece = text[start : at + width].replace(BOS, "<bos>").replace(EOS, "<eos>")
    return repr(("…" if start else "") + piece + ("…" if at + width < len(text) else ""))
