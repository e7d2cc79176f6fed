"""What the benchmark measures: step times, peak memory (and, when asked, a profile), the machine's
matmul throughput, and the useful FLOPs of a training step (one model, the same for every variant)."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence

import torch

from bench.profile import start_profiler, stop_profiler
from bench.report import MatmulRate
from common import hardware
from training.run_log import peak_memory_bytes


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingMeter:
    """Step times and peak memory of a training run: `start()` right before the first optimizer
    step (after loading), `tick()` after each step. With `profile_after=k`, torch.profiler records
    every step after the first k (the warm-up steps); `profiled_operators()` returns what it saw."""

    def __init__(self, device: torch.device, profile_after: int | None = None):
        self.device = device
        self.stamps: list[float] = []
        self.loading_peak_bytes = 0
        self.profile_after = profile_after
        self.profiler: torch.profiler.profile | None = None

    def start(self) -> None:
        self.loading_peak_bytes = peak_memory_bytes(self.device)
        reset_peak_memory(self.device)
        synchronize(self.device)
        self.stamps = [time.perf_counter()]
        self._start_profiler_after_warmup()

    def tick(self) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        self._start_profiler_after_warmup()

    def _start_profiler_after_warmup(self) -> None:
        if self.profile_after is not None and len(self.stamps) - 1 == self.profile_after:
            self.profiler = start_profiler(self.device)

    def profiled_operators(self) -> list[tuple[str, float]]:
        """(operator, self seconds) over the profiled steps; stops the profiler."""
        return stop_profiler(self.profiler, self.device) if self.profiler else []

    def step_seconds(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.stamps, self.stamps[1:])]

    def training_peak_bytes(self) -> int:
        return peak_memory_bytes(self.device)


# ---------------------------------------------------------------------------------- memory

def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for peak_memory_bytes, so loading the model (ours loads float32 before quantizing for QLoRA) is
    told apart from training. On Linux, writing 5 to clear_refs resets the RSS high-water mark that
    ru_maxrss reports; where that is not allowed the peak simply stays the whole-process one."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return  # not allowed here: the peak stays the whole process's


# ---------------------------------------------------------------------------------- the machine

def why_float32(device: torch.device, size: int = 512) -> str:
    """On a CPU without native bf16: bf16 and float32 matmul rates side by side, the reason we compute in
    float32 there (bf16 is emulated; a smaller size than the main measurement, or it takes minutes)."""
    rates = [measure_matmul(device, size, dtype, seconds=1.0) for dtype in (torch.bfloat16, torch.float32)]
    return f"This CPU has no native bf16 ({rates[0]}; {rates[1]}), so every variant computes in float32"


def machine_description(device: torch.device) -> str:
    cpu = _cpu_model() or platform.processor() or platform.machine()
    text = (f"{cpu} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} cores, torch {torch.__version__} "
            f"with {torch.get_num_threads()} threads")
    if device.type == "cuda":
        text += f"; GPU {torch.cuda.get_device_name(device)}"
    return text


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None  # no /proc: the caller falls back to platform's description
    return None


def measure_matmul(device: torch.device, size: int, dtype: torch.dtype, seconds: float = 2.0) -> MatmulRate:
    """Square matmuls of `size` in `dtype` (the one training computes in), repeated for about `seconds`
    after a warm-up."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(4):
            a @ b
        repeats += 4
        synchronize(device)
    flops_per_s = 2 * size**3 * repeats / (time.perf_counter() - started)
    return MatmulRate(flops_per_s, size, hardware.dtype_name(dtype))


# ---------------------------------------------------------------------------------- FLOP model

def useful_step_flops(config, rank: int, sequence_lengths: Sequence[int], supervised_tokens: int) -> int:
    """FLOPs a LoRA step must do, counting each multiply-add as 2 and nothing any variant could skip:

    - frozen decoder linears (N weights): forward 2*N per token, plus the input gradient 2*N per token
      on the way back (frozen weights need no weight gradient, so not the usual 6*N);
    - LoRA A and B on q/k/v/o (N_lora weights): forward, input gradient and weight gradient, 6*N_lora;
    - attention scores and weighted sum, causal (t keys for query t): 4*heads*head_dim*L(L+1)/2 per
      layer forward, twice that backward (gradients for q, k and v); sliding windows are ignored
      (they are longer than these sequences);
    - the LM head only where a label exists: forward 2*V*h plus input gradient 2*V*h per supervised
      token.

    Tokens are the non-pad tokens. Work on padding, logits at unlabelled positions, or recomputation
    by gradient checkpointing is not counted: it is not useful, and the fast variants avoid it.
    """
    hidden, layers = config.hidden_size, config.num_hidden_layers
    query_width = config.num_attention_heads * config.head_dim
    key_width = config.num_key_value_heads * config.head_dim
    attention_weights = hidden * query_width + 2 * hidden * key_width + query_width * hidden
    decoder_weights = layers * (attention_weights + 3 * hidden * config.intermediate_size)
    lora_weights = layers * rank * ((hidden + query_width) + 2 * (hidden + key_width) + (query_width + hidden))
    tokens = sum(sequence_lengths)
    attention_core = layers * 4 * query_width * sum(length * (length + 1) // 2 for length in sequence_lengths)
    head = config.vocab_size * hidden
    return 4 * decoder_weights * tokens + 6 * lora_weights * tokens + 3 * attention_core + 4 * head * supervised_tokens
