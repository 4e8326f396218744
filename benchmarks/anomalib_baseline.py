"""anomalib 2.7.0's own DFKDE fit + test on a Folder dataset (the baseline users run today). Run with the separate
virtualenv that has anomalib (see benchmarks/README.md); prints one JSON line with the wall times.

    .venv-anomalib/bin/python benchmarks/anomalib_baseline.py --root benchmarks/data --backbone resnet18
"""

import argparse
import json
import time

T0 = time.time()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Dfkde

    torch.manual_seed(0)
    t_import = time.time()
    dm = Folder(name="bench", root=args.root, normal_dir="train/good", abnormal_dir="test/bad",
                normal_test_dir="test/good", train_batch_size=args.batch_size, eval_batch_size=args.batch_size,
                num_workers=args.workers)
    model = Dfkde(backbone=args.backbone, pre_trained=False)
    engine = Engine(accelerator="auto", devices=1, logger=False, enable_progress_bar=False,
                    default_root_dir="/tmp/anomalib-bench")
    t_fit = time.time()
    engine.fit(model=model, datamodule=dm)
    t_test = time.time()
    results = engine.test(model=model, datamodule=dm, verbose=False)
    t_end = time.time()
    print(json.dumps({"import_s": t_import - T0, "fit_s": t_test - t_fit, "test_s": t_end - t_test,
                      "process_s": t_end - T0, "metrics": results[0] if results else {}}))


if __name__ == "__main__":
    main()
