from xmdpt.cli import main

main()
