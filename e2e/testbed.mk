# Test-bed targets: thin wrappers around e2e/testbed/testbed (see e2e/README.md).
# Included from the root Makefile with `-include e2e/testbed.mk`.
TESTBED := e2e/testbed/testbed

.PHONY: testbed-build testbed-up testbed-down testbed-status testbed-env

testbed-build: ## Build the test bed's servers (idempotent; cached outside the repo)
	$(TESTBED) build

testbed-up: ## Start control plane, Kafka and MinIO (builds on first use)
	$(TESTBED) up

testbed-down: ## Stop everything the test bed started
	$(TESTBED) down

testbed-status: ## One line per test-bed component
	$(TESTBED) status

testbed-env: ## Print `export ...` lines: eval "$$(make -s testbed-env)"
	@$(TESTBED) env
