"""``python -m attn_inject.timm_train``: runs a timm script with patched models registered
(:mod:`attn_inject.saving.timm_train`)."""

import sys

from .saving.timm_train import main

if __name__ == "__main__":
    sys.exit(main())
