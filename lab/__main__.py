from lab.commands.cli import main

raise SystemExit(main())
