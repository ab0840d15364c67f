"""SiT-XL/2 + REG at global batch 256 on 8-64 GPUs, on paper (issue 13, item 6).

Compute comes from the step measured on one H200 (docs/performance.md: `bench
--profile`, bf16, batch 32); communication from the bytes our ZeRO-1 step moves and
assumed NCCL bus bandwidths, since no per-bucket collective time has been measured on
a multi-GPU machine yet. Every assumption is an argument; the defaults are docs/performance.md's.
Prints a markdown table. Standard library only: python3 tools/scaling_model.py
"""

import argparse


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=float, default=685_017_360, help="SiT-XL/2 + REG parameters")
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--gpus", default="8,16,32,64")
    p.add_argument("--gpus-per-node", type=int, default=8)
    # Measured, H200, batch 32 (ms): forward 24.3, backward 58.0, AdamW + EMA over all
    # parameters 12.5, draws + data + metrics 6.1.
    p.add_argument("--fwd-ms-per-image", type=float, default=24.3 / 32)
    p.add_argument("--bwd-ms-per-image", type=float, default=58.0 / 32)
    p.add_argument("--optim-ms", type=float, default=12.5, help="AdamW + EMA over all parameters on one GPU")
    p.add_argument("--fixed-ms", type=float, default=6.1, help="draws, data, metrics per step")
    # Assumed NCCL bus bandwidths (GB/s): NVLink 4 + NVSwitch within a node, and 4 x 400
    # Gb/s InfiniBand per node (200 GB/s) at 90% across nodes.
    p.add_argument("--nvlink-busbw", type=float, default=350.0)
    p.add_argument("--ib-busbw", type=float, default=180.0)
    p.add_argument("--buckets", type=int, default=28, help="one per SiT block")
    a = p.parse_args()

    print("| GPUs | local batch | step compute (ms) | GB sent per GPU per step: fp32 gather / bf16 gather | exposed comm (ms): "
          "before / built / planned / + bf16 gradients | images/s: built / planned | "
          "efficiency: before / built / planned / + bf16 gradients |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in [int(x) for x in a.gpus.split(",")]:
        b = a.global_batch // n
        fwd, bwd = b * a.fwd_ms_per_image, b * a.bwd_ms_per_image
        # ZeRO-1: each rank updates 1/n of the parameters.
        compute = fwd + bwd + a.optim_ms / n + a.fixed_ms
        busbw = a.nvlink_busbw if n <= a.gpus_per_node else a.ib_busbw
        share = (n - 1) / n
        # Bytes each rank sends: reduce-scatter of fp32 gradients; all-gather of the
        # weights in fp32 (before) or bf16 (built: the compute precision).
        rs = a.params * 4 * share
        ag_today, ag_bf16 = a.params * 4 * share, a.params * 2 * share
        ms = lambda nbytes: nbytes / (busbw * 1e9) * 1e3
        today = ms(rs) + ms(ag_today)
        # Built (dist.overlap): reduce-scatters run under backward, bucket by bucket; the
        # last bucket's cannot. The bf16 all-gather follows the optimiser, exposed.
        exposed_rs = max(ms(rs) / a.buckets, ms(rs) - bwd)
        built = exposed_rs + ms(ag_bf16)
        # Planned: the all-gather also runs under the next forward; the first bucket's
        # cannot.
        exposed_ag = max(ms(ag_bf16) / a.buckets, ms(ag_bf16) - fwd)
        over = exposed_rs + exposed_ag
        # The same with the gradients reduce-scattered in bf16 (half the bytes).
        half = max(ms(rs / 2) / a.buckets, ms(rs / 2) - bwd) + exposed_ag
        gb = f"{(rs + ag_today) / 1e9:.2f} / {(rs + ag_bf16) / 1e9:.2f}"
        ips = " / ".join(f"{n * b / ((compute + x) / 1e3):,.0f}" for x in (built, over))
        eff = " / ".join(f"{compute / (compute + x):.1%}" for x in (today, built, over, half))
        print(f"| {n} | {b} | {compute:.1f} | {gb} | {today:.1f} / {built:.1f} / {over:.1f} / {half:.1f} | {ips} | {eff} |")


if __name__ == "__main__":
    main()
