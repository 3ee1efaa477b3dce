"""`python -m qvgen.convert`: import the paper authors' fake-quant checkpoints (see convert_official)."""

from ..convert_official import main

raise SystemExit(main())
