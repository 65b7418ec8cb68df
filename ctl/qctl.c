int qs_ctl_plan(int argc, char **argv);
int main(int argc, char **argv) { return argc > 1 ? qs_ctl_plan(argc - 1, argv + 1) : 2; }
