"""Self-checks for the notebooks' "your turn" cells: `from lorakit.exercises import check_merged_weight`.

Each check takes the learner's function, runs it on cases with known answers (from a reference implementation or a
real library), prints a friendly verdict — what is right, what is wrong, expected vs got — and returns True or False.
It never raises a bare AssertionError: an exception inside the learner's code is reported as part of the verdict.

    common.py     attempt, run_cases, compare_tensors, conclude, verdict: what every check shares
    basics.py     00 start here, 01 low-rank math, 02 NF4
    layers.py     03 flash attention, 04 PEFT wrapping
    training.py   05 Trainer run, 06 ZeRO-3
    capstone.py   07 capstone
    planning.py   08 will it fit
    study.py      09 what matters
"""

from lorakit.exercises.basics import (
    check_chat_prompt,
    check_lora_from_delta,
    check_merged_weight,
    check_nf4_roundtrip,
    check_pack_4bit,
    check_reverse_answer,
)
from lorakit.exercises.capstone import check_merge_adapter, check_train_flags
from lorakit.exercises.common import attempt, compare_tensors, conclude, run_cases, verdict
from lorakit.exercises.layers import (
    check_attention_visibility,
    check_is_lora_target,
    check_lora_parameter_count,
    check_online_softmax_step,
)
from lorakit.exercises.planning import check_loss_bytes, check_nf4_bytes
from lorakit.exercises.study import check_lora_scale, check_pareto_front
from lorakit.exercises.training import (
    check_adapter_names,
    check_label_conversation,
    check_last_checkpoint,
    check_zero3_shard,
)

__all__ = [
    "attempt", "compare_tensors", "conclude", "run_cases", "verdict",
    "check_reverse_answer", "check_chat_prompt",  # 00
    "check_merged_weight", "check_lora_from_delta",  # 01
    "check_pack_4bit", "check_nf4_roundtrip",  # 02
    "check_online_softmax_step", "check_attention_visibility",  # 03
    "check_lora_parameter_count", "check_is_lora_target",  # 04
    "check_last_checkpoint", "check_label_conversation",  # 05
    "check_adapter_names", "check_zero3_shard",  # 06
    "check_train_flags", "check_merge_adapter",  # 07
    "check_loss_bytes", "check_nf4_bytes",  # 08
    "check_lora_scale", "check_pareto_front",  # 09
]
