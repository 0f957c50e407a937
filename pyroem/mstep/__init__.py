"""M-steps: conjugate pairs, the mixture M-step, recognised closed forms, gradient steps."""
