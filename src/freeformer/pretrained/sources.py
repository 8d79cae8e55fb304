"""Read a pretrained decoder: a Hugging Face model directory or a GGUF file.

Both formats are brought to one intermediate form, :class:`SourceModel`: a Hugging Face
style ``config.json`` dict, tensors under their Hugging Face names (float32, in Hugging
Face's layout) and the source's tokenizer. The renaming into freeformer's parameters then
happens once, in :mod:`freeformer.pretrained.convert`, whatever the file format.

Safetensors are read with ``safetensors`` alone; GGUF needs the ``gguf`` package (reading
and dequantisation) and, for its tokenizer, transformers' GGUF tokenizer conversion — both
in the ``pretrained`` extra and imported only here. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from freeformer.data.tokenizer import HFTokenizer, _import_tokenizers
from freeformer.errors import ConvertError, UserError

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "freeformer")
_ARCH_HELP = (
    "supported: llama (and SmolLM, which is Llama), mistral, qwen2 / qwen2.5, and "
    "freeformer (a Free Transformer written by `freeformer export`)"
)


@dataclass
class SourceModel:
    """A pretrained model as read from disk, before any renaming."""

    path: Path
    format: str
    """"safetensors" or "gguf"."""
    arch: str
    """One of SUPPORTED_ARCHS."""
    config: dict[str, Any]
    """Hugging Face config.json keys (for GGUF: translated from its metadata)."""
    shapes: dict[str, tuple[int, ...]]
    """Every tensor of the source, by Hugging Face name, with its shape."""
    load: Callable[[str], torch.Tensor]
    """Hugging Face name → float32 tensor in Hugging Face layout."""
    tokenizer: HFTokenizer

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "architecture": self.arch}


def read_source(src: str | Path) -> SourceModel:
    """A Hugging Face model directory or a ``.gguf`` file; anything else is refused."""
    path = Path(src).expanduser()
    if not path.exists():
        raise ConvertError(
            f"{str(path)!r} does not exist; give a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer.json) or a .gguf file"
        )
    if path.is_dir():
        return read_hf_dir(path)
    if path.suffix.lower() == ".gguf":
        return read_gguf(path)
    raise ConvertError(
        f"{str(path)!r} is neither a directory nor a .gguf file; give a Hugging "
        "Face model directory or a .gguf file"
    )


# ---------------------------------------------------------------------------------------
# Hugging Face directory
# ---------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is unreadable or not JSON ({e})".splitlines()[0]) from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return obj


def _arch_of(model_type: Any, where: str) -> str:
    if model_type not in SUPPORTED_ARCHS:
        raise ConvertError(f"{where}: architecture {model_type!r} is not supported ({_ARCH_HELP})")
    return model_type


def read_hf_dir(path: Path) -> SourceModel:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(
            f"{path} has no config.json; give a Hugging Face model directory "
            "(config.json, *.safetensors, tokenizer.json) or a .gguf file"
        )
    config = _read_json(cfg_path)
    arch = _arch_of(config.get("model_type"), f"{cfg_path} model_type")
    shapes, load = _open_safetensors(path)
    return SourceModel(
        path, "safetensors", arch, config, shapes, load, _hf_dir_tokenizer(path, config)
    )


def _open_safetensors(
    path: Path,
) -> tuple[dict[str, tuple[int, ...]], Callable[[str], torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index} has no weight_map")
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            (
                f" ({pickled[0]} is a pickle, which freeformer never loads: re-save the model "
                "with save_pretrained(safe_serialization=True))"
            )
            if pickled
            else ""
        )
        raise ConvertError(f"{path} holds no *.safetensors weights{hint}")
    handles: dict[str, Any] = {}
    where: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        f = path / name
        if not f.is_file():
            raise ConvertError(f"{index.name} names shard {name}, which is missing from {path}")
        try:
            h = safe_open(str(f), framework="pt")
            keys = list(h.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise ConvertError(f"cannot read {f}: {e}".splitlines()[0]) from None
        handles[name] = h
        for k in keys:
            if k in where:
                raise ConvertError(f"tensor {k} is stored twice ({where[k]} and {name})")
            where[k] = name
            shapes[k] = tuple(h.get_slice(k).get_shape())
    if index.is_file():
        missing = [k for k, v in weight_map.items() if where.get(k) != v]
        if missing:
            raise ConvertError(
                f"{index.name} places {missing[0]} in {weight_map[missing[0]]}, "
                "which does not hold it; the shards do not match their index"
            )

    def load(name: str) -> torch.Tensor:
        return handles[where[name]].get_tensor(name).float()

    return shapes, load


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json holds special tokens as strings or {"content": ...} objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _hf_dir_tokenizer(path: Path, config: dict[str, Any]) -> HFTokenizer:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ConvertError(
            f"{path} has no tokenizer.json (a SentencePiece tokenizer.model alone "
            "is not read): save the fast tokenizer with save_pretrained"
        )
    tcfg = (
        _read_json(path / "tokenizer_config.json")
        if (path / "tokenizer_config.json").is_file()
        else {}
    )
    smap = (
        _read_json(path / "special_tokens_map.json")
        if (path / "special_tokens_map.json").is_file()
        else {}
    )
    gcfg = (
        _read_json(path / "generation_config.json")
        if (path / "generation_config.json").is_file()
        else {}
    )
    tokenizers = _import_tokenizers()
    try:
        raw = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise ConvertError(
            f"{tok_file} is not a valid tokenizer.json "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None

    def special(name: str, fallback: bool) -> str | None:
        text = _token_text(tcfg.get(name)) or _token_text(smap.get(name))
        if text is None and fallback:  # the model's ids (config.json, generation_config.json)
            i = _first_id(config.get(f"{name}_id"))
            i = _first_id(gcfg.get(f"{name}_id")) if i is None else i
            text = raw.id_to_token(i) if i is not None else None
        return text

    # BOS only as the tokenizer declares it (Qwen2 declares none; transformers' tokenizer
    # then has no BOS, and lm-eval prefixes with EOS). EOS must exist: documents end with it.
    eos, bos = special("eos_token", True), special("bos_token", False)
    if eos is None:
        raise ConvertError(
            f"{path}: no EOS token named in tokenizer_config.json, "
            "special_tokens_map.json, config.json or generation_config.json"
        )
    add_bos = tcfg.get("add_bos_token")
    if not isinstance(add_bos, bool):
        # What the tokenizer's own post-processor does when asked for special tokens.
        bos_id = raw.token_to_id(bos) if bos is not None else None
        with_special = raw.encode("a", add_special_tokens=True).ids
        plain = raw.encode("a", add_special_tokens=False).ids
        add_bos = bos_id is not None and with_special[:1] == [bos_id] and plain[:1] != [bos_id]
    template = tcfg.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    if not isinstance(template, str):
        template = None  # absent, or a list of named templates (kept out: not one template)
    try:
        return HFTokenizer(
            raw,
            spec=f"pretrained:{path.name}",
            pretrained=True,
            eos_token=eos,
            bos_token=bos,
            add_bos=bool(add_bos),
            chat_template=template,
        )
    except UserError as e:
        raise ConvertError(f"{tok_file}: {e}") from None


# ---------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------
# llama.cpp's tensor names → Hugging Face names ({i}: block index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# GGUF architecture → ours. llama.cpp files Mistral (no sliding window) under "llama".
_GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2"}


def _gguf_template(name: str) -> tuple[str, str | None]:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        return ".".join(["blk", "{i}", *parts[2:]]), parts[1]
    return name, None


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation for its "llama" architecture.

    convert_hf_to_gguf stores, per head, the rows of the two rotary halves interleaved
    (pairs (x0, x_{d/2}), (x1, x_{d/2+1}), ...) for ggml's adjacent-pair RoPE; Hugging Face
    and freeformer rotate the first half against the second. This is the inverse reshape.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise UserError(
            "reading .gguf files needs the gguf package: pip install 'freeformer[pretrained]'"
        ) from None
    return gguf


def read_gguf(path: Path) -> SourceModel:
    gguf = _import_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors on foreign bytes
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"{path} is not a readable GGUF file ({first})") from None

    def field(key: str, required: bool = True) -> Any:
        f = reader.fields.get(key)
        if f is None:
            if required:
                raise ConvertError(f"{path}: GGUF metadata {key} is missing")
            return None
        return f.contents()

    g_arch = field("general.architecture")
    if g_arch not in _GGUF_ARCHS:
        raise ConvertError(f"{path}: GGUF architecture {g_arch!r} is not supported ({_ARCH_HELP})")
    arch = _GGUF_ARCHS[g_arch]
    a = g_arch
    n_heads = int(field(f"{a}.attention.head_count"))
    n_kv = int(field(f"{a}.attention.head_count_kv", False) or n_heads)
    dim = int(field(f"{a}.embedding_length"))
    scaling = field(f"{a}.rope.scaling.type", False)
    if scaling not in (None, "none"):
        raise ConvertError(
            f"{path}: RoPE scaling {scaling!r} is not supported "
            "(only Llama 3.1's, from a Hugging Face directory)"
        )
    head_dim = (
        field(f"{a}.attention.key_length", False)
        or field(f"{a}.rope.dimension_count", False)
        or dim // n_heads
    )
    config: dict[str, Any] = {
        "model_type": arch,
        "hidden_size": dim,
        "num_hidden_layers": int(field(f"{a}.block_count")),
        "intermediate_size": int(field(f"{a}.feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(head_dim),
        "rope_theta": float(field(f"{a}.rope.freq_base", False) or 10000.0),
        "rms_norm_eps": float(field(f"{a}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(field(f"{a}.context_length")),
        "hidden_act": "silu",
    }

    tensors: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            raise ConvertError(
                f"{path}: tensor rope_freqs.weight (Llama 3.1 RoPE scaling stored "
                "as frequency factors) is not supported; convert the Hugging "
                "Face directory of this model instead"
            )
        template, i = _gguf_template(t.name)
        hf = _GGUF_TO_HF.get(template)
        if hf is None:
            raise ConvertError(
                f"{path}: unexpected tensor {t.name} for a {g_arch} model; "
                "refusing to drop weights silently"
            )
        hf = hf.replace("{i}", i) if i is not None else hf
        tensors[hf] = t
        shapes[hf] = tuple(int(s) for s in reversed(t.shape))  # ggml lists dims innermost first
    config["vocab_size"] = int(
        field(f"{a}.vocab_size", False) or shapes.get("model.embed_tokens.weight", (0,))[0]
    )
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors

    def load(name: str) -> torch.Tensor:
        t = tensors[name]
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ConvertError(
                f"{path}: tensor {t.name} has quantisation type "
                f"{t.tensor_type.name}, which the gguf package cannot "
                "dequantize; use a file with another type"
            ) from None
        w = torch.from_numpy(
            np.array(arr, dtype=np.float32)
        )  # a copy: GGUF data is a read-only map
        w = w.reshape(shapes[name])
        if g_arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # qwen2 files are stored for NEOX (half-split) RoPE and need nothing.
            w = unpermute_rope_rows(w, n_heads if "q_proj" in name else n_kv)
        return w

    return SourceModel(path, "gguf", arch, config, shapes, load, _gguf_tokenizer(path, field))


def _gguf_tokenizer(path: Path, field: Callable[..., Any]) -> HFTokenizer:
    """The GGUF's tokenizer, through transformers' GGUF → tokenizers conversion."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UserError(
            "building the tokenizer of a .gguf file needs transformers: "
            "pip install 'freeformer[pretrained-gguf]'"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers raises many types on foreign metadata
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConvertError(f"{path}: its tokenizer cannot be built ({first})") from None
    raw = getattr(tok, "backend_tokenizer", None)
    if raw is None or tok.eos_token is None:
        raise ConvertError(f"{path}: its tokenizer has no fast backend or no EOS token")
    add_bos = field("tokenizer.ggml.add_bos_token", False)
    if add_bos is None:
        with_special = tok("a", add_special_tokens=True)["input_ids"]
        add_bos = tok.bos_token_id is not None and with_special[:1] == [tok.bos_token_id]
    template = (
        tok.chat_template
        if isinstance(tok.chat_template, str)
        else field("tokenizer.chat_template", False)
    )
    try:
        return HFTokenizer(
            raw,
            spec=f"pretrained:{path.name}",
            pretrained=True,
            eos_token=tok.eos_token,
            bos_token=tok.bos_token,
            add_bos=bool(add_bos),
            chat_template=template,
        )
    except UserError as e:
        raise ConvertError(f"{path}: {e}") from None
