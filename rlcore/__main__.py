from rlcore import dist
from rlcore.cli import main

dist.exit_rank(main())
