#!/usr/bin/env python3
"""Chaos run: trains a small SiT + REG on 2 MPI ranks and, at seeded random moments,
injects the faults a cluster user meets, restarting the job with `--resume auto` after
each (as a SLURM requeue would) until it reaches its last step. Then it compares the
final weights, EMA and optimiser state, byte for byte, with a run that never failed.

Faults (one kind a fault):
  kill_step     SIGKILL of one rank while it trains
  kill_write    SIGKILL of one rank while it writes a checkpoint shard (a temporary file)
  kill_rename   SIGKILL of rank 0 after the shards are renamed, before the manifest
  preempt       SIGTERM to every rank: the agreed checkpoint, exit 0
  hang          SIGSTOP of one rank past dist.timeout_s: the watchdog ends the job naming it
  full_disk     a file-size limit on the ranks (prlimit --fsize) during a save
  bitrot        a flipped byte in the newest checkpoint's shard after it was committed:
                --resume auto falls back to the previous one, with a warning naming the file
  second_job    a second job on the same run folder while one runs: refused at once (exit 2,
                one line naming the folder and the running job); the running job goes on

Prints one JSON line: faults injected by kind, faults survived, restarts, steps redone, the
largest loss of work in steps, bytes of temporary files left, whether the final state
matched, and the failures (empty when every fault was survived). Exit status 0 only when
every fault was survived, nothing was left behind and the final state matched.

  python3 tools/chaos.py --faults 60 --seed 7 --out /tmp/chaos      # a long run
  python3 tools/chaos.py --faults 8 --seed 1 --out /tmp/chaos-mini  # the suite's miniature
  python3 tools/chaos.py --plan preempt,bitrot,bitrot,bitrot --out /tmp/chaos-rot
Uses only the standard library; needs mpirun, prlimit and target/release/reg-ddp.
"""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

KINDS = ["kill_step", "kill_write", "kill_rename", "preempt", "hang", "full_disk", "bitrot", "second_job"]
REPO = Path(__file__).resolve().parents[1]
RANKS = 2
TIMEOUT_S = 4  # dist.timeout_s: how long a hung peer is waited for
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}


def settings(out, name, steps):
    """The run: the demo preset widened so that a checkpoint write takes long enough to be
    caught in the middle (about 70 MB over 2 ranks), `micro_batch` fixed so that results do
    not depend on how often the job restarts."""
    sets = {
        "train.output_dir": out, "train.name": name, "train.steps": steps, "train.checkpoint_every": 3,
        "train.keep_checkpoints": 3, "train.log_every": 1, "train.global_batch": 4, "train.micro_batch": 1,
        "model.hidden_size": 256, "model.projector_dim": 1024, "dist.timeout_s": TIMEOUT_S,
    }
    args = ["train", "--config", str(REPO / "configs/demo.yaml"), "--json", "--threads", "1", "--resume", "auto"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


class Job:
    """One mpirun of the training job, its output read as it comes."""

    def __init__(self, binary, args, fsize=None):
        cmd = ["mpirun", "-np", str(RANKS)]
        if fsize is not None:
            # The limit applies to the ranks (prlimit execs them), not to mpirun.
            cmd += ["prlimit", f"--fsize={fsize}", "--"]
        cmd += [binary] + args
        env = dict(os.environ, **MPI_ENV)
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  start_new_session=True)
        self.out, self.err = [], []
        self.pids = {}
        self.steps = []
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in [(self.p.stdout, self.out), (self.p.stderr, self.err)]]
        for r in self.readers:
            r.start()

    def _read(self, stream, buf):
        for line in stream:
            buf.append(line.rstrip("\n"))
            if buf is self.out:
                try:
                    j = json.loads(line)
                except ValueError:
                    continue
                if "pid" in j and "rank" in j:
                    self.pids[j["rank"]] = j["pid"]
                if "loss" in j:
                    self.steps.append(j["step"])

    def running(self):
        return self.p.poll() is None

    def last_step(self):
        return max(self.steps, default=None)

    def wait(self, timeout):
        try:
            code = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = None
        for r in self.readers:
            r.join(5)
        return code

    def kill(self):
        for pid in self.pids.values():
            signal_pid(pid, signal.SIGKILL)
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()

    def signal(self, rank, sig):
        signal_pid(self.pids[rank], sig)


def signal_pid(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(cond, timeout, every=0.0005):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(every)
    return None


def complete(run):
    """Complete checkpoints (with a manifest), oldest first."""
    return sorted(p for p in run.glob("step-*") if p.name[5:].isdigit() and (p / "manifest.json").exists())


def temporaries(run):
    return [p for p in run.rglob("*") if p.is_file() and ".tmp-" in p.name]


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shards(step_dir):
    return {p.name: sha(p) for p in sorted(step_dir.glob("rank-*.safetensors"))}


def resumed_step(err):
    for line in err:
        if "resumed from" in line and "(step " in line:
            return int(line.rsplit("(step ", 1)[1].rstrip(")"))
    return 0


class Chaos:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.out = Path(a.out).resolve()
        self.run = self.out / "chaos"
        self.binary = str(Path(a.binary).resolve())
        self.injected = {k: 0 for k in KINDS}
        self.survived = 0
        self.failures = []
        self.restarts = 0
        self.redone = 0
        self.largest_loss = 0
        self.last_seen = 0
        # The first faults are one of each kind, in a seeded order; then any kind.
        self.plan = self.rng.sample(KINDS, len(KINDS)) + [self.rng.choice(KINDS) for _ in range(max(0, a.faults - len(KINDS)))]
        self.plan = self.plan[:a.faults]
        if a.plan:
            self.plan = a.plan.split(",")
            unknown = [k for k in self.plan if k not in KINDS]
            if unknown:
                raise SystemExit(f"chaos: --plan: unknown fault kinds {unknown} (known: {', '.join(KINDS)})")

    def args(self):
        return settings(str(self.out), "chaos", self.a.steps)

    def fail(self, kind, why, job=None):
        tail = " | ".join((job.err if job else [])[-3:])
        self.failures.append({"kind": kind, "why": why, "stderr": tail[-600:]})

    def start(self, fsize=None):
        """Starts the job (`--resume auto`) and, once it has said where it resumes, counts the
        steps it will redo."""
        job = Job(self.binary, self.args(), fsize)
        if not wait_for(lambda: (len(job.pids) == RANKS and (job.steps or resumed_step(job.err) or
                                                              any("no complete checkpoint" in l for l in job.err)))
                        or not job.running(), 120, 0.002):
            job.kill()
            raise SystemExit("chaos: the job did not start within 120 s")
        self.restart_from(job)
        return job

    def account(self, job):
        """Steps done since the last restart that the next start will redo."""
        self.last_seen = max(self.last_seen, job.last_step() or 0)

    def restart_from(self, job):
        resumed = resumed_step(job.err)
        lost = max(0, self.last_seen - resumed)
        self.redone += lost
        self.largest_loss = max(self.largest_loss, lost)
        self.last_seen = resumed

    def done(self):
        status = self.run / "status.json"
        return status.exists() and json.loads(status.read_text()).get("state") == "done"

    def inject(self, kind, job):
        """Injects `kind` into the running `job`; returns whether the fault was survived as
        promised (what the job did is checked here, what it kept is checked by the restart
        and the final comparison)."""
        rank = self.rng.randrange(RANKS)
        start = job.last_step() or resumed_step(job.err)
        if kind == "kill_step":
            wait_for(lambda: (job.last_step() or 0) >= start + self.rng.randint(1, 3) or not job.running(), 60, 0.001)
            time.sleep(self.rng.uniform(0, 0.05))
            job.signal(rank, signal.SIGKILL)
            return self.ended_badly(kind, job)
        if kind in ("kill_write", "kill_rename"):
            def point():
                for d in (d for d in self.run.glob("step-*") if d.name[5:].isdigit()):
                    if kind == "kill_write" and any(".tmp-" in p.name for p in d.iterdir()):
                        return True
                    if kind == "kill_rename" and len(list(d.glob("rank-*.safetensors"))) == RANKS \
                            and not (d / "manifest.json").exists():
                        return True
                return False
            if not wait_for(lambda: point() or not job.running(), 120):
                self.fail(kind, "the job never reached the point", job)
                return False
            if not job.running():
                return None  # ended before the point: not injected, tried again later
            job.signal(0 if kind == "kill_rename" else rank, signal.SIGKILL)
            return self.ended_badly(kind, job)
        if kind == "preempt":
            wait_for(lambda: (job.last_step() or 0) >= start + self.rng.randint(1, 3) or not job.running(), 60, 0.001)
            for r in range(RANKS):
                job.signal(r, signal.SIGTERM)
            code = job.wait(120)
            state = json.loads((self.run / "status.json").read_text()).get("state") if (self.run / "status.json").exists() else None
            if code != 0 or state != "preempted":
                self.fail(kind, f"exit {code}, status {state}", job)
                return False
            return True
        if kind == "hang":
            wait_for(lambda: (job.last_step() or 0) >= start + 1 or not job.running(), 60, 0.001)
            job.signal(rank, signal.SIGSTOP)
            code = job.wait(TIMEOUT_S * 10 + 60)
            job.signal(rank, signal.SIGKILL)
            named = any("no progress" in l and f"[{rank}]" in l for l in job.err)
            if code in (0, None) or not named:
                self.fail(kind, f"exit {code}; watchdog line naming rank {rank}: {named}", job)
                return False
            return True
        if kind == "second_job":
            wait_for(lambda: (job.last_step() or 0) >= start + 1 or not job.running(), 60, 0.001)
            before = job.last_step() or 0
            second = Job(self.binary, self.args())
            code = second.wait(60)
            lines = [l for l in second.err if l.startswith("error")]
            refused = code == 2 and len(lines) == 1 and str(self.run) in lines[0] and "in use by another job" in lines[0]
            # The running job goes on: it trains further steps (or has finished cleanly).
            went_on = wait_for(lambda: (job.last_step() or 0) > before or (not job.running() and job.p.returncode == 0), 60, 0.01)
            if not (refused and went_on):
                self.fail(kind, f"second job: exit {code}, {lines[:2]}; first went on: {bool(went_on)}", second)
                return False
            return True
        raise AssertionError(kind)

    def ended_badly(self, kind, job):
        code = job.wait(TIMEOUT_S * 10 + 60)
        if code == 0:
            self.fail(kind, "the job exited 0 after a rank was killed", job)
            return False
        return True

    def full_disk(self):
        """Starts the job with a file-size limit below one shard: the next save fails on
        both ranks, which stop naming the last complete checkpoint, leaving nothing behind."""
        shard = max((p.stat().st_size for c in complete(self.run) for p in c.glob("rank-*")), default=0)
        job = self.start(fsize=max(4096, shard // 2))
        code = job.wait(300)
        self.account(job)
        last = complete(self.run)
        named = any("checkpoint" in l and (not last or last[-1].name in l) for l in job.err)
        ok = code not in (0, None) and named and not temporaries(self.run)
        if not ok:
            self.fail("full_disk", f"exit {code}, names the last checkpoint: {named}, temporaries: {temporaries(self.run)}", job)
        return job, ok

    def bitrot(self):
        """Flips a byte in the middle of the newest complete checkpoint's first shard; the next
        start must fall back to the checkpoint before it, with a warning naming the file."""
        ckpts = complete(self.run)
        shard = sorted(ckpts[-1].glob("rank-*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        at = self.rng.randrange(len(data) // 4, len(data))
        data[at] ^= 0x55
        shard.write_bytes(bytes(data))
        job = self.start()
        warned = any(shard.name in l and ckpts[-1].name in l for l in job.err)
        resumed = resumed_step(job.err)
        ok = warned and resumed == int(ckpts[-2].name.split("-")[1])
        if not ok:
            self.fail("bitrot", f"warned {warned}, resumed at {resumed}, wanted {ckpts[-2].name}", job)
        return job, ok

    def chaos(self):
        plan = list(self.plan)
        needs_checkpoints = ("full_disk", "bitrot")
        started = time.monotonic()
        starts = 0
        while not self.done():
            if time.monotonic() - started > self.a.limit_s:
                self.fail("-", f"not done within {self.a.limit_s} s")
                break
            starts += 1
            if plan and plan[0] in needs_checkpoints and len(complete(self.run)) >= 2:
                kind = plan.pop(0)
                self.injected[kind] += 1
                job, ok = self.full_disk() if kind == "full_disk" else self.bitrot()
                self.survived += ok
            else:
                job = self.start()
            # Every fault that needs a running job goes into this one while it runs.
            while job.running() and plan and plan[0] not in needs_checkpoints:
                result = self.inject(plan[0], job)
                if result is None:
                    break
                kind = plan.pop(0)
                self.injected[kind] += 1
                self.survived += bool(result)
            if job.running() and plan:
                # The next fault needs two complete checkpoints: train until they exist,
                # then stop cleanly.
                # Past every checkpoint on disk, so that the stop's checkpoint is the newest.
                newest = max((int(c.name[5:]) for c in complete(self.run)), default=-1)
                wait_for(lambda: (len(complete(self.run)) >= 2 and (job.last_step() or 0) > newest) or not job.running(),
                         600, 0.01)
                self.stop(job)
            elif job.running():
                code = job.wait(1800)
                if code != 0:
                    self.fail("-", f"a job without a fault exited {code}", job)
            self.account(job)
        self.restarts = max(0, starts - 1)
        if plan:
            self.fail("-", f"the run ended before these faults: {plan}")

    def stop(self, job):
        """A clean stop (SIGTERM to every rank, the agreed checkpoint): not a fault."""
        for r in range(RANKS):
            job.signal(r, signal.SIGTERM)
        code = job.wait(300)
        self.account(job)
        if code not in (0, None) and not self.done():
            self.fail("-", f"a clean stop exited {code}", job)

    def reference(self):
        ref = self.out / "reference"
        args = settings(str(self.out), "reference", self.a.steps)
        if not (ref / f"step-{self.a.steps:07d}" / "manifest.json").exists():
            job = Job(self.binary, args)
            if job.wait(1800) != 0:
                raise SystemExit("chaos: the uninterrupted run failed:\n" + "\n".join(job.err[-5:]))
        return ref / f"step-{self.a.steps:07d}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=len(KINDS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plan", default="", help="these fault kinds in this order (comma-separated) instead of a seeded draw")
    ap.add_argument("--steps", type=int, default=0, help="training steps (default: 6 per fault, at least 48)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--binary", default=str(REPO / "target/release/reg-ddp"))
    ap.add_argument("--limit-s", type=float, default=3600)
    a = ap.parse_args()
    a.steps = a.steps or max(48, 6 * (len(a.plan.split(",")) if a.plan else a.faults))
    c = Chaos(a)
    if c.run.exists():
        raise SystemExit(f"chaos: {c.run} exists; give another --out")
    c.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ref = c.reference()
    c.chaos()
    final = c.run / f"step-{a.steps:07d}"
    matched = final.exists() and (final / "manifest.json").exists() and shards(final) == shards(ref)
    left = sum(p.stat().st_size for p in temporaries(c.run))
    report = {
        "seed": a.seed, "steps": a.steps, "faults": sum(c.injected.values()), "by_kind": c.injected,
        "survived": c.survived, "restarts": c.restarts, "steps_redone": c.redone, "largest_loss_steps": c.largest_loss,
        "temporary_bytes_left": left, "final_state_matched": matched, "seconds": round(time.monotonic() - t0, 1),
        "failures": c.failures,
    }
    print(json.dumps(report))
    ok = matched and left == 0 and not c.failures and c.survived == sum(c.injected.values())
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
