"""Regional compilation with shared compiled rewrites vs one compile per block instance (FLUX width, few blocks).
Usage: python benchmarks/regional_share_check.py share|per_instance (one mode per process: compile caches warm up).

Per mode: compile time (first 3 steps), then the per-step wall time of steps 3..13 and the GPU time by kernel kind
of one sparse step (12). Writes regional_share_check_<gpu>.json.
"""
import statistics, sys, time, os
import torch
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_size_flux import FULL, build, make_inputs, kind_of
import chipmunk_compile
from chipmunk_compile import backend


def run(share, steps=14, full=False):
    backend.SHARE_COMPILES = share
    torch._dynamo.reset(); chipmunk_compile.reset()
    config = FULL if full else dict(FULL, num_layers=4, num_single_layers=8)
    model = build(config, "cuda", torch.bfloat16)
    inputs = make_inputs(config, (48, 80), 512, "cuda", torch.bfloat16)
    model.compile_repeated_blocks(backend="chipmunk", options=dict(num_steps=50, token_grid=[1, 48, 80]))
    times, hosts, x = [], [], inputs["hidden_states"]
    t_start = time.perf_counter()
    with torch.no_grad():
        for s in range(steps):
            args = dict(inputs, hidden_states=x, timestep=torch.full((1,), 1.0 - s / 50, device="cuda", dtype=x.dtype))
            torch.cuda.synchronize(); t0 = time.perf_counter()
            if s in (10, 11):
                v = model(**args)[0]
                hosts.append((time.perf_counter() - t0) * 1e3)
            elif s == 13 and os.environ.get("HOST_PROFILE"):  # cProfile of one sparse step's host work
                import cProfile, pstats
                prof_host = cProfile.Profile()
                prof_host.enable()
                v = model(**args)[0]
                prof_host.disable()
                pstats.Stats(prof_host).sort_stats("tottime").print_stats(30)
            elif s == 12:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                    v = model(**args)[0]; torch.cuda.synchronize()
            else:
                v = model(**args)[0]
            torch.cuda.synchronize(); times.append((time.perf_counter() - t0) * 1e3)
            if s == 2:
                compile_s = time.perf_counter() - t_start
            x = x - v / 50
    by_kind, top = {}, {}
    for e in prof.key_averages():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0:
            by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0) + e.self_device_time_total / 1e3
            top[e.key] = top.get(e.key, 0) + e.self_device_time_total / 1e3
    cpu_top = sorted(((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()), key=lambda t: -t[1])[:12]
    row = dict(share=share, compile_s=compile_s, host_ms=hosts, step_ms=times, median_sparse_ms=statistics.median(times[3:12] + times[13:]),
               by_kind=by_kind, top=sorted(top.items(), key=lambda kv: -kv[1])[:12], cpu_top=cpu_top)
    print(f"share={share}: first 3 steps {compile_s:.1f} s, median step {row['median_sparse_ms']:.1f} ms, "
          f"steps {[round(t, 1) for t in times[3:]]}, host (call returns) {[round(t, 1) for t in hosts]}", flush=True)
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"    {k:20s} {v:8.2f} ms")
    for name, ms in row["top"]:
        print(f"    {ms:8.2f} ms  {name[:100]}")
    for name, ms, n in cpu_top:
        print(f"    cpu {ms:8.2f} ms x{n} {name[:90]}")
    del model
    return row


def full_generation(share):
    """The full-size model (19 + 38 blocks): the compiling first generation, two timed generations (median), one with
    a sync after every step (per-step times)."""
    from full_size_flux import generate
    backend.SHARE_COMPILES = share
    model = build(FULL, "cuda", torch.bfloat16)
    inputs = make_inputs(FULL, (48, 80), 512, "cuda", torch.bfloat16)
    model.compile_repeated_blocks(backend="chipmunk", options=dict(num_steps=50, token_grid=[1, 48, 80]))
    t0 = time.perf_counter()
    generate(model, inputs, 50, "cuda")
    first_s = time.perf_counter() - t0
    walls = [generate(model, inputs, 50, "cuda")[0] for _ in range(2)]
    step_ms = generate(model, inputs, 50, "cuda", per_step=True)[1]
    row = dict(share=share, first_generation_s=first_s, generation_ms=statistics.median(walls), generations_ms=walls,
               median_step_ms=statistics.median(step_ms), step_ms=step_ms)
    print(f"full size share={share}: first generation {first_s:.1f} s, generation {row['generation_ms']:.0f} ms, "
          f"median step {row['median_step_ms']:.1f} ms; steps {[round(t) for t in step_ms]}", flush=True)
    return row


if __name__ == "__main__":
    from results_io import write_results
    if "--full" in sys.argv:
        mode = sys.argv[1]
        write_results(f"regional_share_check_full_{mode}", dict(rows=[full_generation(mode == "share")]))
    else:
        row = run(sys.argv[1] == "share")
        write_results(f"regional_share_check_{sys.argv[1]}", dict(rows=[row]))
