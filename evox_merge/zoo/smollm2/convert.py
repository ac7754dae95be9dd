"""Turn a GGUF file into an fp32 Hugging Face model directory (safetensors + tokenizer), once.

transformers dequantises GGUF tensors on load (with the `gguf` package) but refuses to ``save_pretrained`` the
loaded model (its config still says ``quant_method: gguf``). The model is therefore rebuilt from its config,
without the quantisation entry, and given the dequantised state dict; that copy saves like any other model.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import torch

from evox_merge.zoo.smollm2.errors import SourceUnavailableError

logger = logging.getLogger(__name__)


def convert_gguf(gguf_path: Path, out_dir: Path, name: str = "base") -> Path:
    """Load `gguf_path` with transformers' GGUF support and save it as an fp32 safetensors model directory
    (config, weights, generation config, tokenizer) in `out_dir`; returns `out_dir`.

    Args:
        name: recorded as the model's ``name_or_path`` (PEFT writes it into each adapter's config).

    Raises:
        SourceUnavailableError: the `gguf` package is missing, or the file is not a GGUF model transformers reads.
    """
    try:
        import gguf  # noqa: F401  (transformers imports it lazily; fail early with an actionable message)
    except ImportError:
        raise SourceUnavailableError(
            "reading the SmolLM2 GGUF needs the 'gguf' package: pip install 'evox-merge[smollm2]' (or pip install gguf)"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, filename = str(gguf_path.parent), gguf_path.name
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' dequantisation progress bar
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise SourceUnavailableError(f"cannot read {gguf_path} as a GGUF model: {error}") from error
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = config._name_or_path = name
    with torch.device("meta"):
        model = type(loaded)(config)
    state = {key: value.detach().to(torch.float32).contiguous() for key, value in loaded.state_dict().items()}
    model.load_state_dict(state, assign=True, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.name_or_path = name
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del loaded
    return out_dir
