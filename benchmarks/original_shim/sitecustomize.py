"""Run the original ViLLA code (github.com/StanfordMIMI/villa) on a machine without CUDA, for
benchmarks/bench_original.py only: this folder is on PYTHONPATH of the original's processes and of no other.

The original calls ``.cuda()`` and ``.to("cuda")`` throughout; here they keep tensors and modules on the CPU.
Everything else (its data loading, loops, losses, file formats) runs as written. ``torch.cuda.amp.autocast`` and
``GradScaler`` disable themselves without CUDA, as they would on the original's machine without a GPU.

Also, whatever the device: ``matplotlib.cm.get_cmap`` (removed in matplotlib 3.9, which numpy 2 needs; the
original's DocMNIST colours call it) is given back as ``matplotlib.colormaps.get_cmap``, when ``matplotlib.cm`` is
first imported (not before, so no process pays for an import it would not make).
"""

import os
import sys


class _GetCmapCompat:
    def find_spec(self, name, path=None, target=None):
        if name != "matplotlib.cm":
            return None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            if not hasattr(module, "get_cmap"):
                import matplotlib

                def get_cmap(name=None, lut=None):
                    cmap = matplotlib.colormaps.get_cmap(name)
                    return cmap if lut is None else cmap.resampled(lut)

                module.get_cmap = get_cmap

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("VILLA_ORIGINAL_SHIM") == "1":
    sys.meta_path.insert(0, _GetCmapCompat())

if os.environ.get("VILLA_ORIGINAL_ON_CPU") == "1":
    import torch

    def _cpu(x):
        if isinstance(x, str) and x.startswith("cuda"):
            return "cpu"
        if isinstance(x, torch.device) and x.type == "cuda":
            return torch.device("cpu")
        return x

    def _wrap(to):
        def patched(self, *args, **kwargs):
            args = tuple(_cpu(a) for a in args)
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return to(self, *args, **kwargs)

        return patched

    torch.Tensor.to = _wrap(torch.Tensor.to)
    torch.nn.Module.to = _wrap(torch.nn.Module.to)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
