int qs_ctl_plan(int argc, char **argv) { (void)argc; (void)argv; return 0; }
