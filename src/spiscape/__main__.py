from spiscape.cli import main

raise SystemExit(main())
