"""Average LoRA adapters trained by one recipe (e.g. with different --seed) into one adapter whose update
is exactly the mean of theirs (lora/averaging.py): a rank r1 + r2 + ... adapter in PEFT's layout, which
generate.py, evaluate.py, export.py and PEFT load like any other.

    python average.py outputs/seed42 outputs/seed1 --out outputs/average

A cheap ensemble of training runs; on the embedded defaults (make train's recipe, seeds 42 and 1) it scored
no better than either run (docs/experiments.md). Adapters trained on an NF4 base
(make qlora) average only with each other.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.files import FileError, check_new_folder, write_folder
from lora import AdapterError, average_adapters, save_adapter_tensors
from lora.adapter import trained_on_nf4
from training.run_log import write_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapters", nargs="+", help="two or more adapter folders (ours or PEFT's) of one base model")
    parser.add_argument("--out", required=True, help="new folder for the averaged adapter (never overwritten)")
    args = parser.parse_args(argv)
    try:
        write_average([Path(folder) for folder in args.adapters], Path(args.out))
    except (AdapterError, FileError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"average of {len(args.adapters)} adapters written to {args.out}")
    return 0


def write_average(adapters: list[Path], out: Path) -> None:
    """Average `adapters` into the new folder `out`, written whole or not at all."""
    check_new_folder(out, "average")
    on_nf4 = {trained_on_nf4(folder) for folder in adapters}
    if len(on_nf4) > 1:
        raise AdapterError("some adapters were trained on an NF4 base (make qlora) and some not; "
                           "average only adapters of one base")
    config, tensors = average_adapters(adapters)

    def write(staging: Path) -> None:
        save_adapter_tensors(tensors, staging, config)
        # Read back by generate.py / evaluate.py / export.py to decide the base (NF4 or not).
        write_settings(staging, {"averaged_from": [str(folder) for folder in adapters], "qlora": on_nf4.pop()})

    write_folder(out, write, "average")


if __name__ == "__main__":
    sys.exit(main())
