"""The Kronecker math: kron (apply / materialise, the dtype rule, the schedule policy),
schedules (the chunked and batched applies), shapes (the shape and prime planners)."""
