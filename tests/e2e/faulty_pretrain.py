"""nsa-pretrain with an injected write error (a full disk) for the tests:

    python tests/e2e/faulty_pretrain.py STEP_TAG --config ... [nsa-pretrain args]

Every ``torch.save`` into a path containing STEP_TAG raises ENOSPC after writing a few
bytes, as a disk that fills up mid-save would."""
import errno
import sys

import torch

from nsa_dist.training.cli import main

tag = sys.argv.pop(1)
real_save = torch.save


def save(obj, f, *args, **kwargs):
    if isinstance(f, str) and tag in f:
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", f)
    return real_save(obj, f, *args, **kwargs)


torch.save = save
sys.exit(main())
