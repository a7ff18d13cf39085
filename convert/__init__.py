"""torch/timm <-> Flax conversion. Imports torch only in the CLIs and the parity check; core.py is numpy."""
