"""Runs ``projects/train_net.py`` in this process with a fault injected (for the reliability
tests): ``python -m tests.engine.harness MODE ITER -- <train_net arguments>``.

MODE:
  kill_during_write   SIGKILL halfway through writing the checkpoint of iteration ITER
  kill_before_tag     SIGKILL after that checkpoint is renamed into place, before
                      ``last_checkpoint`` names it
  kill_after_save     SIGKILL once the checkpoint of ITER and ``last_checkpoint`` are written
  disk_full           writing the checkpoint of iteration ITER fails with ENOSPC
  nan_loss            from iteration ITER on, ``loss_giou`` of the first decoder layer is NaN
  none                no fault
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "projects"))


def _kill():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    mode, it = sys.argv[1], int(sys.argv[2])
    assert sys.argv[3] == "--"
    argv = sys.argv[4:]

    import torch

    from cqdino.engine import checkpoint

    target = f"model_{it:07d}.pth"
    real_save = torch.save

    if mode == "kill_during_write":

        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and "trainer" in obj and obj.get("iteration") == it:
                f.write(b"\x80\x02partial checkpoint")
                f.flush()
                _kill()
            return real_save(obj, f, *a, **k)

        torch.save = save
    elif mode in ("kill_before_tag", "kill_after_save"):
        real_tag = checkpoint.AtomicCheckpointer.tag_last_checkpoint

        def tag(self, basename):
            if basename == target and mode == "kill_before_tag":
                _kill()
            real_tag(self, basename)
            if basename == target:
                _kill()

        checkpoint.AtomicCheckpointer.tag_last_checkpoint = tag
    elif mode == "disk_full":
        import errno

        def save(obj, f, *a, **k):
            if isinstance(obj, dict) and "trainer" in obj and obj.get("iteration") == it:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *a, **k)

        torch.save = save
    elif mode == "nan_loss":
        from detectron2.utils.events import get_event_storage

        from cqdino.modeling import SetCriterion

        real_forward = SetCriterion.forward

        def forward(self, *a, **k):
            losses = real_forward(self, *a, **k)
            if get_event_storage().iter >= it and "loss_giou_0" in losses:
                losses["loss_giou_0"] = losses["loss_giou_0"] * float("nan")
            return losses

        SetCriterion.forward = forward
    elif mode != "none":
        sys.exit(f"unknown mode {mode}")

    import train_net

    train_net.cli(argv)


if __name__ == "__main__":
    main()
