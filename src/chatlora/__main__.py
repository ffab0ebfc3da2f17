from chatlora.cli import main

raise SystemExit(main())
