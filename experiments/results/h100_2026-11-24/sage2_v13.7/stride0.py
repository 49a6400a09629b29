"""sage1/sage2 on the GPU with V (and K) expanded across the batch (stride 0): TMA descriptors or not,
the result must equal the contiguous inputs'."""
import torch, sage1, sage2
from common.inputs import make_qkv
q, k, v = make_qkv(3, 2, 300, 128, device="cuda", seed=1)
ke, ve = k[:1].expand(3, -1, -1, -1), v[:1].expand(3, -1, -1, -1)
for name, fn in (("sage1", sage1.sageattn), ("sage2", lambda *a, **kw: sage2.sageattn(*a, backend="triton", **kw))):
    a = fn(q, ke, ve)
    b = fn(q, ke.contiguous(), ve.contiguous())
    print(name, "stride-0 K/V equal to contiguous:", torch.equal(a, b), flush=True)
