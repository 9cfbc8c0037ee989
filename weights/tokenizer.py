"""The tokenizer as the engine sees it, from an HF folder (`tokenizer.json`) or GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from jaxembed.weights.errors import WeightLoadError


@dataclasses.dataclass(frozen=True)
class TokenizerBundle:
    """A `tokenizers.Tokenizer` whose post-processor already adds BOS/EOS as the model expects."""

    tokenizer: Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    # Tokens that end a generation: EOS, end-of-turn, and the model's generation config's list.
    stop_token_ids: tuple[int, ...] = ()


def _token_id(tok: Tokenizer, value: Any) -> int | None:
    if isinstance(value, dict):  # older tokenizer_config.json: {"content": "<s>", ...}
        value = value.get("content")
    return tok.token_to_id(value) if isinstance(value, str) else None


def tokenizer_from_hf_folder(folder: Path) -> TokenizerBundle:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise WeightLoadError(folder, "no tokenizer.json in the model folder")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
        raise WeightLoadError(path, f"not a valid tokenizer.json: {e}") from e
    cfg: dict[str, Any] = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise WeightLoadError(cfg_path, f"not valid JSON: {e}") from e
    template = cfg.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    bos = _token_id(tok, cfg.get("bos_token"))
    eos = _token_id(tok, cfg.get("eos_token"))
    pad = _token_id(tok, cfg.get("pad_token"))
    # tokenizer.json's post-processor is what adds special tokens; report what it does.
    probe = tok.encode("a").ids
    add_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    add_eos = eos is not None and len(probe) > 1 and probe[-1] == eos
    if isinstance(template, list):  # named templates: the default one serves chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    stops = [eos, *_listed_ids(folder / "config.json"), *_listed_ids(folder / "generation_config.json")]
    return TokenizerBundle(tok, bos, eos, pad, add_bos, add_eos,
                           template if isinstance(template, str) else None,
                           tuple(dict.fromkeys(i for i in stops if i is not None)))


def _listed_ids(path: Path) -> list[int]:
    """`eos_token_id` of a JSON config: one id or a list of them (absent or unreadable: none)."""
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]
