"""``meshllm pull``: download a Hugging Face checkpoint into the hub cache, then export it.

For devices that are online. The download is huggingface_hub's (its cache,
its resume, its offline mode: with ``HF_HUB_OFFLINE=1`` a checkpoint already
in the cache is used without the network); only the files ``meshllm export``
reads are fetched. The export is :func:`meshllm.model.export.export`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from meshllm.errors import ModelError
from meshllm.model.export import export
from meshllm.model.manifest import Manifest

log = logging.getLogger(__name__)

#: Checkpoints known to work, with their sizes (parameters; fp32 / fp16 model directory; int8 is about
#: 0.28x and int4 about 0.16x the fp32 size).
KNOWN_MODELS = {
    "HuggingFaceTB/SmolLM2-135M": "135M parameters; 0.6 GB fp32, 0.3 GB fp16",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "135M parameters; 0.6 GB fp32, 0.3 GB fp16 (chat template)",
    "Qwen/Qwen2.5-0.5B-Instruct": "0.5B parameters; 2.5 GB fp32, 1.3 GB fp16 (chat template)",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "1.1B parameters; 4.4 GB fp32, 2.2 GB fp16 (chat template)",
    "meta-llama/Llama-3.2-1B": "1.2B parameters; 6.0 GB fp32, 3.0 GB fp16 (gated: needs an HF token)",
}
PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]


def default_out(model_id: str, dtype: str) -> Path:
    return Path("models") / f"{model_id.split('/')[-1]}-{dtype}"


def pull(model_id: str, out: str | Path | None = None, *, dtype: str = "fp32", revision: str | None = None,
         max_seq_len: int | None = None, overwrite: bool = False, block_size: int | None = None,
         accuracy_level: int | None = None) -> tuple[Manifest, Path]:
    from meshllm.model.export import quant_spec

    quant_spec(dtype, block_size, accuracy_level)  # bad options fail before the download
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(model_id, revision=revision, allow_patterns=PATTERNS)
    except LocalEntryNotFoundError as e:
        raise ModelError(f"cannot download {model_id}: offline and not in the Hugging Face cache ({e}); "
                         f"on an offline device, copy the checkpoint over and use `meshllm export DIR OUT`") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise ModelError(f"cannot download {model_id}: {e}") from None
    out = Path(out) if out else default_out(model_id, dtype)
    log.info("exporting %s from %s", model_id, local)
    manifest = export(local, out, dtype=dtype, max_seq_len=max_seq_len, overwrite=overwrite,
                      name=model_id.split("/")[-1], block_size=block_size, accuracy_level=accuracy_level)
    return manifest, out
