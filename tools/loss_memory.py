"""Peak host memory of one forward + backward with full logits vs the chunked loss (CPU).

    python tools/loss_memory.py 0       # full logits
    python tools/loss_memory.py 2048    # loss_chunk = 2048 positions
"""
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nsa_dist import ModelConfig  # noqa: E402
from nsa_dist.models import NSADecoderLM  # noqa: E402

chunk = int(sys.argv[1])
cfg = ModelConfig(vocab_size=32000, hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
                  intermediate_size=512, max_seq_len=16384, attention="dense")
torch.manual_seed(0)
m = NSADecoderLM(cfg)
m.loss_chunk = chunk
ids = torch.randint(0, 32000, (1, 16384))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
out = m(ids, torch.roll(ids, -1, 1))
out.loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"loss_chunk={chunk}: loss {out.loss.item():.6f}, peak RSS {peak/2**20:.2f} GiB (before forward {base/2**20:.2f}), {time.time()-t:.1f} s")
