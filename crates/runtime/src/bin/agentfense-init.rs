//! `agentfense-init`: PID 1 inside every bubblewrap sandbox. All logic lives in
//! [`agentfense_runtime::init`]; the only argument is the control socket's fd number.

fn main() {
    agentfense_runtime::init::run_main()
}
