"""genforge: one Python stack for generative models, from raw data to a served API."""

import logging

# With the [quant] extra installed, transformers' modeling code imports torchao, which logs a warning
# per optional CUDA extension it cannot load and per enum it registers with torch's pytree, on every
# command; none of those extensions is used here.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"
