"""
RLRP training on one CPU, one GPU, or many GPUs.

  python train.py config/train_cpu.py                     # a laptop CPU, a few minutes
  python train.py --batch_size=8 --compile=False          # the default run on one GPU, with overrides
  torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_owt.py          # one 8-GPU node
  torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 train.py \\
      config/train_gpt2_owt.py --gradient_accumulation_steps=48                  # 16 GPUs: divisible by 16

Each optimizer step is a fluency or a reasoning step (schedules.Router, routing (ii)), the same on every
rank. Micro-batches are drawn by global index (schedules.micro_batch_index) and are pure functions of it, K
is drawn from (seed, iter) and dropout's RNG reseeded from (seed, global micro-batch index): the same config
trains on the same examples with the same masks on 1 process or on W, and a resumed run continues exactly
where the checkpoint left it. Every key, its default and its checks:
config/defaults.py (`--help` lists them).
"""

import importlib.util
import math
import os
import signal
import sys
from contextlib import nullcontext
from time import perf_counter

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import data
from checkpoint import build_model
from config.defaults import (DEFAULTS, DEFAULTS_FILE, RENAMED, check, check_needs, check_reasoning,
                             latent_keys_warning, resolve_tokenizer, training_rows)
from configurator import ConfigError, catch_stop_signals, configure, precision, setup_system
from evaluate import all_reduce_dict, all_reduce_sum, eval_metrics, eval_sets, evaluate_reasoning, format_eval
from losses import Counts, ObjectiveConfig, rlrp_loss, sampled_unembeds, supervise
from records import Records, TrainWindow
from schedules import (Curriculum, Router, max_n_steps, micro_batches, sampling_generator, seed_micro_batch,
                       step_plan)

# -----------------------------------------------------------------------------
# the config: config/defaults.py's keys, presets and --key=value overrides, or a checkpoint's when resuming


def load_config(argv):
    """(config, checkpoint): with init_from=resume the checkpoint's config is the base that argv overrides
    (checkpoint.resume_config), else DEFAULTS; checkpoint is None unless resuming. Checked: CONSTRAINTS, and
    for a new run NEEDS (a resumed run cannot change those keys)."""
    c, ckpt = configure(DEFAULTS, argv, doc=__file__, keys_doc=DEFAULTS_FILE, renamed=RENAMED), None
    if c["init_from"] == "resume":
        path = os.path.join(c["out_dir"], "ckpt.pt")
        ckpt = checkpoint.load(path)
        c = checkpoint.resume_config(DEFAULTS, ckpt["config"], argv)
        if c["max_iters"] <= ckpt["iter_num"] and not c["eval_only"]:
            raise ConfigError(f"max_iters={c['max_iters']}, but {path} is at iter {ckpt['iter_num']} "
                              "already: nothing to train; raise max_iters to go on, or evaluate it with "
                              "eval_only=True")
    if not ckpt:
        resolve_tokenizer(c)
    check(c)
    if not ckpt:
        check_needs(c)
    if c["wandb_log"] and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=True needs wandb: pip install wandb")
    return c, ckpt

# -----------------------------------------------------------------------------
# the data, and the loss's token counts and logged values summed over ranks


def load_data(c, ckpt=None):
    """(tokenizer, FluencyData | None, ReasoningData | None), light to build; a bad path or file: one line.
    The tokenizer: checkpoint.tokenizer (a resumed run's own)."""
    try:
        tok = checkpoint.tokenizer(c, ckpt)
        fluency = data.FluencyData(c["fluency_data"], tok, c["block_size"], c["seed"]) \
            if c["fluency_data"] else None
        reasoning = data.ReasoningData(c["reasoning_data"], tok, c["block_size"], c["seed"],
                                       c["reasoning_eval_data"], tasks=c["reasoning_tasks"],
                                       gsm8k_answer=c["gsm8k_answer"], step_targets=c["step_targets"],
                                       eval_tasks=c["eval_tasks"]) \
            if c["reasoning_data"] else None
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e
    return tok, fluency, reasoning


def step_counts(batches, c, device, world):
    """The Counts of this optimizer step: over every micro-batch on every rank (losses.Counts)."""
    valid, rl, answer = all_reduce_sum(Counts.of(batches, c["rl_answer_only"]).to(device), world).float()
    return Counts(valid=valid, rl=rl, answer=answer)


def reduce_logged(logged, stop, world):
    """(logged, ranks asked to stop): an optimizer step's logged sums over every rank, as floats (nll_k a
    list), and how many ranks got a stop signal, in one all-reduce: all ranks stop at the same step. Sampled
    deep supervision: nll_k is ℓ_k's mean over the tokens that drew step k, None where none did."""
    sums = all_reduce_dict({**logged, "stop": logged["loss"].new_tensor(float(bool(stop)))}, world)
    if "drawn_k" in sums:
        sums["nll_k"] = [total / drawn if drawn else None for total, drawn in zip(sums["nll_k"],
                                                                                 sums.pop("drawn_k"))]
    return sums, sums.pop("stop")

# -----------------------------------------------------------------------------
# one micro-batch's objective, composed from the model's parts

class Objective(nn.Module):
    """
    One micro-batch's RLRP objective, composed from the GPT's parts: h = trunk(x), o_k from the head, ℓ of
    the supervised (k, b, t) (all, or the draw's), then rlrp_loss; with the progressive loss also a second
    head pass, L = (1 − α)·L_K + α·L_{n+k}. A module around the model, so that DDP wraps the whole forward:
    its gradient hooks see every parameter use, as they would not if train.py called model.module's parts.
    """

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def step_nll(self, x, sup):
        """ℓ (K1(+1), B, T) of every (k, b, t), or sampled (R,) at sup.rows() only, in one unembedding."""
        gpt, grad_steps, readout_grad = self.model, self.cfg.grad_steps or None, self.cfg.readout_grad
        gpt.check_inputs(x, sup.targets)
        h = gpt.trunk(x)                                                           # (B, T, C)
        o = gpt.head_outputs(h, sup.n_steps, grad_steps, readout_grad)            # o_k, (K1, B, T, C)
        if sup.progressive:   # o_{n+k} of a second pass: n steps without gradient, then k with it
            n, k = sup.progressive
            o = torch.cat([o, gpt.latent_head(h, n + k, grad_steps=k, readout_grad=readout_grad)[-1:]])
        if sup.draw is None:
            return torch.stack([gpt.step_nll(o_k, y_k) for o_k, y_k in zip(o, sup.targets)])
        rows = sup.rows()                                                          # o_k of those rows, (R, C)
        return gpt.step_nll(o.flatten(0, 2)[rows], sup.targets.reshape(-1)[rows])

    def forward(self, b, sup, kind, counts):
        """Batch b and its Supervision on the device; counts: the optimizer step's Counts -> (loss, logged):
        this micro-batch's share of the step's global mean and the detached ds, rl, imp, nll_k (sampled:
        drawn_k too)."""
        cfg = self.cfg
        terms = dict(lambda_rl=cfg.lambda_rl, lambda_imp=cfg.lambda_imp, rl_answer_only=cfg.rl_answer_only,
                     margin=cfg.imp_margin, rl_q=cfg.rl_q, answer_weight=cfg.answer_weight, counts=counts,
                     rl_rows=b.rl_rows)
        nll, second = sup.split(self.step_nll(b.x, sup))
        loss, logged = rlrp_loss(nll.float(), b.y, b.answer_mask, kind, sup.weights, draw=sup.draw, **terms)
        if second is not None:   # L = (1 − α)·L_K + α·L_{n+k}: step n+k of the second pass, weight 1 where
            alpha = cfg.progressive_alpha                        # step n+k may be trained (second_weights)
            loss = (1 - alpha) * loss + alpha * rlrp_loss(second.float(), b.y, b.answer_mask, kind,
                                                          sup.second_weights, **terms)[0]
        return loss, {"loss": loss.detach(), **logged}

# -----------------------------------------------------------------------------
# the run


class Run:
    """One training run: the model (compiled, DDP-wrapped), its optimizer and loss scaler, the data and the
    fixed eval sets, and what rank 0 writes to out_dir: metrics.jsonl (and wandb) and checkpoints."""

    def __init__(self, argv):
        c, ckpt = load_config(argv)
        self.c, self.resumed = c, ckpt is not None
        self.rank, local_rank, self.world, self.device = setup_system(c)
        self.master, device_type = self.rank == 0, self.device.split(":")[0]
        self.ctx, self.scaler = precision(c, device_type)
        torch.manual_seed(c["seed"])
        self.tok, self.fluency, self.reasoning = load_data(c, ckpt)
        if self.reasoning:
            check_reasoning(c, training_rows(self.reasoning), max_n_steps(c))
        for line in latent_keys_warning(c) if self.master else []:   # legal, but not what it may look like
            print(f"train.py: warning: {line}", file=sys.stderr)
        self.curriculum = Curriculum(c, self.reasoning and self.reasoning.levels, (ckpt or {}).get(
            "curriculum_switches", ()))
        self.router = Router(c["reasoning_fraction"])
        self.curriculum_slices = {}   # level -> this rank's share of its training-side slice
        self.raw_model = build_model(c, self.tok, ckpt).to(self.device)
        self.optimizer = self.raw_model.configure_optimizers(c["weight_decay"], c["learning_rate"],
                                                             (c["beta1"], c["beta2"]), device_type)
        self.start_iter = checkpoint.restore(ckpt, self.optimizer, self.scaler)
        del ckpt  # free the memory
        if c["compile"] if c["compile"] is not None else device_type == "cuda":
            self.raw_model.compile_parts()   # the trunk and one refinement step: any K reuses the same graphs
        self.objective_config = ObjectiveConfig.of(c)
        self.model = Objective(self.raw_model, self.objective_config)   # the training forward: ℓ and the loss
        if self.world > 1:
            # truncated backward: when K > grad_steps, z_0 is detached and W_in gets no gradient in that step
            self.model = DDP(self.model, device_ids=[local_rank] if device_type == "cuda" else None,
                             find_unused_parameters=0 < c["grad_steps"] < max_n_steps(c))
        self.eval_sets = eval_sets(self.fluency, self.reasoning, c, rank=self.rank, world=self.world,
                                   device=self.device)
        self.tokens_per_iter = c["gradient_accumulation_steps"] * c["batch_size"] * c["block_size"]
        self.peak_tflops = c["gpu_peak_tflops"] if device_type == "cuda" else None   # for MFU
        self.ckpt_path = os.path.join(c["out_dir"], "ckpt.pt")
        self.records = Records(os.path.join(c["out_dir"], "metrics.jsonl"))
        if self.master:
            self.start_records()
        self.saved_at, self.checkpointed = perf_counter(), self.resumed   # whether ckpt_path is this run's

    def start_records(self):
        """Rank 0's records: metrics.jsonl (a fresh run starts a fresh one) and wandb; and what runs."""
        c = self.c
        os.makedirs(c["out_dir"], exist_ok=True)
        if not c["eval_only"]:
            self.records.start(self.start_iter if self.resumed else None)
        print(f"{self.raw_model.get_num_params() / 1e6:.2f}M parameters | K={c['n_steps']} | {self.world} "
              f"process(es) on {self.device} | {self.tokens_per_iter:,} tokens per iter | "
              f"writing {c['out_dir']}/")
        if c["wandb_log"]:
            import wandb
            wandb.init(project=c["wandb_project"], name=c["wandb_run_name"], config=c, resume="allow")
            self.records.wandb = wandb

    def record(self, rec):
        if self.master:
            self.records.write(rec)

    def evaluate(self, it):
        """The eval record at iteration `it`, printed by rank 0."""
        self.raw_model.eval()
        with self.ctx:
            fluency_val, reasoning_val, tags = self.eval_sets
            metrics = eval_metrics(self.raw_model, fluency_val, reasoning_val, tags,
                                   n_steps=self.c["n_steps"], n_examples=self.c["eval_examples"],
                                   world=self.world)
        self.raw_model.train()
        rec = {"type": "eval", "iter": it, "tokens": it * self.tokens_per_iter, **metrics}
        if self.master:
            tqdm.write(format_eval(rec))
        return rec

    def save(self, it):
        if self.master:   # rank 0 alone writes, so its own clock may decide when: no collective
            state = checkpoint.state(self.raw_model, self.optimizer, self.scaler, it=it, config=self.c,
                                     curriculum_switches=self.curriculum.switches, tokenizer=self.tok)
            checkpoint.save(self.ckpt_path, state)
        self.saved_at, self.checkpointed = perf_counter(), True

    def eval_due(self, it):
        return it % self.c["eval_interval"] == 0 or it == self.c["max_iters"]

    def checkpoint_due(self, it):
        """Between evals (which save anyway): every checkpoint_interval steps, and checkpoint_minutes after
        the last checkpoint."""
        c = self.c
        by_steps = c["checkpoint_interval"] and it % c["checkpoint_interval"] == 0
        by_time = c["checkpoint_minutes"] and perf_counter() - self.saved_at > 60 * c["checkpoint_minutes"]
        return not self.eval_due(it) and (by_steps or by_time)

    def check_curriculum(self, it):
        """The threshold curriculum after iteration `it` (schedules.Curriculum.check), in eval mode."""
        self.raw_model.eval()
        with self.ctx:
            joined = self.curriculum.check(it, self.slice_exact_match)
        self.raw_model.train()
        if joined and self.master:
            tqdm.write(joined)

    def slice_exact_match(self, level):
        """Exact match per step on this level's training-side slice (data.ReasoningData.slice_batches), this
        rank's share built once and summed over ranks: the same examples at every check."""
        n, slices = Curriculum.EXAMPLES, self.curriculum_slices
        if level not in slices:
            batches = self.reasoning.slice_batches(level, self.c["batch_size"], n)
            slices[level] = [b.to(self.device) for b in batches[self.rank::self.world]]
        return evaluate_reasoning(self.raw_model, slices[level], self.c["n_steps"], n,
                                  self.world)["answer_exact_match"]

    def flops_per_token(self, step):
        """Training FLOPs per token of a StepPlan: the model's at K, plus the progressive loss's second head
        pass and its one unembedding when it is on; sampled deep supervision: the unembeddings it runs."""
        c, K = self.c, step.n_steps
        N = c["batch_size"] * c["block_size"]
        unembeds = sampled_unembeds(K, N, c["imp_fraction"]) if c["sampled_supervision"] else None
        flops = self.raw_model.flops_per_token(K, c["block_size"], c["grad_steps"], unembeds)["total"]
        if step.progressive:
            steps = sum(step.progressive)                                 # n + k
            second = self.raw_model.flops_per_token(steps, c["block_size"], step.progressive[1])
            flops += second["head"] + second["unembed"] / steps
        return flops

    def micro_step(self, index, b, step, counts):
        """Micro-batch `index` (global) of an optimizer step: its Supervision, then the forward and the
        objective (Objective) -> (loss, logged); the loss is this micro-batch's share of the step's global
        mean (counts: step_counts)."""
        c = self.c
        seed_micro_batch(c, index)                                   # dropout's masks: (seed, index)
        draws = sampling_generator(c, index) if c["sampled_supervision"] else None
        sup = supervise(b, step.n_steps, self.objective_config, step.progressive, draws)   # Y, W on the CPU
        with self.ctx:
            return self.model(b.to(self.device), sup.to(self.device), step.kind, counts)

    def train(self):
        """The training loop. Per optimizer step: evaluate and save when due; the step's plan (kind, K,
        learning rate: functions of (seed, it)) and micro-batches; forward + backward per micro-batch; clip
        and step; log; the threshold curriculum; a stop signal or a checkpoint when due."""
        c, stop = self.c, catch_stop_signals()
        pbar = tqdm(total=c["max_iters"], initial=self.start_iter, disable=not self.master,
                    dynamic_ncols=True)
        window = TrainWindow(self.tokens_per_iter)
        for it in range(self.start_iter, c["max_iters"] + 1):
            if self.eval_due(it) and not (self.resumed and it == self.start_iter):
                self.record(self.evaluate(it))
                if it > self.start_iter:
                    self.save(it)
            if it == c["max_iters"]:
                break
            t_step = perf_counter()
            step = step_plan(it, c, self.router, self.curriculum)    # the same on every rank, and on resume
            for group in self.optimizer.param_groups:
                group["lr"] = step.lr
            micro = micro_batches(it, c, (self.fluency, self.reasoning), kind=step.kind, n_steps=step.n_steps,
                                  level=step.level, rank=self.rank, world=self.world)
            counts = step_counts([b for _, b in micro], c, self.device, self.world)
            logged = {}
            for m, (index, b) in enumerate(micro):
                # DDP all-reduces the gradients once, after the last micro-batch
                with self.model.no_sync() if self.world > 1 and m < len(micro) - 1 else nullcontext():
                    loss, parts = self.micro_step(index, b, step, counts)
                    # DDP averages gradients over ranks; the loss is already a global mean, so undo the 1/W
                    self.scaler.scale(loss * self.world).backward()
                logged = {k: logged.get(k, 0) + v for k, v in parts.items()}
            logged, stopping = reduce_logged(logged, stop, self.world)
            if not math.isfinite(logged["loss"]):
                saved = (f"the last good checkpoint is {self.ckpt_path}" if self.checkpointed
                         else "no checkpoint written yet")
                raise FloatingPointError(f"non-finite loss at iter {it} ({step.kind} step); parameters not "
                                         f"updated, {saved}; lower learning_rate or check the data")
            if c["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            pbar.update(1)
            window.add(step.kind, step.n_steps, logged, self.flops_per_token(step), perf_counter() - t_step)
            if (it + 1) % c["log_interval"] == 0:
                rec = window.record(it + 1, step.lr, self.world, self.peak_tflops)
                if step.level:   # a curriculum: the highest level this step trained
                    rec["curriculum_level"] = step.level
                self.record(rec)
                window = TrainWindow(self.tokens_per_iter)
                pbar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            if c["curriculum_threshold"] and (it + 1) % c["curriculum_interval"] == 0:
                self.check_curriculum(it + 1)
            if stopping:  # SIGINT / SIGTERM: this step is done; save it and leave
                self.save(it + 1)
                pbar.close()
                self.exit(f"train.py: stopped by a signal after iter {it + 1}; checkpoint written to "
                          f"{self.ckpt_path} (continue with --init_from=resume)",
                          128 + (stop or [signal.SIGTERM])[0])
            if self.checkpoint_due(it + 1):
                self.save(it + 1)
        pbar.close()
        self.exit(f"done: metrics in {self.records.path}, checkpoint in {self.ckpt_path}")

    def exit(self, message=None, code=None):
        """Rank 0 prints the message (to stderr with an exit code); the process group ends; then the exit."""
        if self.master and message:
            print(message, file=sys.stderr if code else sys.stdout)
        if self.world > 1:
            dist.barrier()  # every rank done with its collectives before any tears down (a gloo exit race)
            dist.destroy_process_group()
        if code:
            sys.exit(code)


def main(argv):
    run = Run(argv)
    if run.c["eval_only"]:  # evaluate the model as loaded, once; the checkpoint is left untouched
        run.record(dict(run.evaluate(run.start_iter), type="eval_only"))
        run.exit()
    else:
        run.train()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ConfigError, FloatingPointError) as e:
        # under torchrun every rank raises the same error: rank 0 says it, the others exit quietly
        sys.exit(f"train.py: {e}" if int(os.environ.get("RANK", 0)) == 0 else 1)
