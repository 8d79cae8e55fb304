"""One-off GPU probe: where does the FT's per-token decode cost go? (profiler, per-step sync timing)."""
import sys, time, torch
sys.path.insert(0, "bench")
import theory
from freeformer import FreeTransformer, ModelConfig
from freeformer.generate import generate
from torch.profiler import profile, ProfilerActivity

dev = torch.device("cuda")
print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
shapes = {n: c for n, c, _, _ in theory.bench_train_shapes(16)}
cfg = shapes["d512-L8"].replace(max_seq_len=96)
for latent in (True, False):
    m = FreeTransformer(cfg.replace(latent=latent)).to(dev, torch.bfloat16).eval()
    p = torch.randint(0, cfg.vocab_size, (1, 16), device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    generate(m, p, 8, temperature=0, generator=g)
    torch.cuda.synchronize(); t = time.perf_counter()
    generate(m, p, 64, temperature=0, generator=g)
    torch.cuda.synchronize(); dt = time.perf_counter() - t
    print(f"latent={latent}: {1000*dt/64:.2f} ms/token (64 tokens)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(m, p, 16, temperature=0, generator=g)
        torch.cuda.synchronize()
    ev = prof.key_averages()
    print(ev.table(sort_by="self_cuda_time_total", row_limit=12), flush=True)
    print(ev.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    del m
