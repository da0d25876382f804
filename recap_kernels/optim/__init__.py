"""Drop-in replacement for ``torch.optim``.

Every public name of ``torch.optim`` is re-exported unchanged (``SGD``, ``lr_scheduler``,
``Optimizer``, the functional modules, ...), except ``Adam``, ``AdamW`` and ``Adagrad``, which are
recap_kernels' subclasses of torch's classes: same arguments plus ``backend``, same state and
numbers, with the update running on fused kernels; and one more optimizer for embedding tables,
``RowWiseAdagrad`` (torchrec's arguments and state, FBGEMM's row-wise numbers). Migrating is one line::

    from recap_kernels import optim      # was: from torch import optim
"""

import torch.optim as _torch_optim
from torch.optim import *  # noqa: F401,F403  (the drop-in: everything torch.optim exports)

# Submodules and other public attributes that ``import *`` does not bring (lr_scheduler, swa_utils, ...).
globals().update({k: v for k, v in vars(_torch_optim).items() if not k.startswith("_") and k not in globals()})

from recap_kernels.optim._adagrad import Adagrad  # noqa: E402, F401
from recap_kernels.optim._adam import Adam, AdamW  # noqa: E402, F401
from recap_kernels.optim._rowwise_adagrad import RowWiseAdagrad  # noqa: E402, F401

# The same names as torch.optim (Adam/AdamW/Adagrad being ours), and RowWiseAdagrad.
__all__ = [*_torch_optim.__all__, "RowWiseAdagrad"]
