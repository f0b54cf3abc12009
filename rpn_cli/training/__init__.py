"""Training an RPN: anchor targets and losses, the teacher's pseudo-labels, the resumable loop."""
