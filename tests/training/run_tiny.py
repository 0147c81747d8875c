"""Subprocess entry for the multi-device / multi-process tests: train a config, print losses.

    python tests/train/run_tiny.py CONFIG_JSON [process_id num_processes port]
XLA_FLAGS (simulated devices) must be set by the caller before this process imports jax.
MOKA_TEST_ORBAX_DIR: after training, every process saves the adapter there with
moka_jax.save_adapter(format="orbax"), as a multi-host orbax write requires.
"""

import json
import os
import sys

from moka_jax.config import config_from_dict


def main():
    d = json.loads(sys.argv[1])
    if len(sys.argv) > 2:
        pid, nproc, port = map(int, sys.argv[2:5])
        d.setdefault("mesh", {})["distributed"] = {
            "coordinator_address": f"127.0.0.1:{port}", "num_processes": nproc, "process_id": pid}
    from moka_jax.training.run import train

    out = train(config_from_dict(d), quiet=True)
    if os.environ.get("MOKA_TEST_ORBAX_DIR"):
        import moka_jax
        moka_jax.save_adapter(out["model"], os.environ["MOKA_TEST_ORBAX_DIR"], format="orbax")
    import jax
    print(json.dumps({"losses": out["losses"], "devices": jax.device_count(),
                      "processes": jax.process_count()}))


if __name__ == "__main__":
    main()
