from .cli_daemon import main

main()
