"""Safety applications of the runnable ACG: backdoor removal, compiling, distillation, detection."""
