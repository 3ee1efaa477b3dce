"""`python -m qvgen.convert`: import the paper authors' fake-quant checkpoints (see qvgen.adapters.official)."""

from ..adapters.official import main

raise SystemExit(main())
