# kme — make targets. `make help` lists them.
CONFIG ?= kme.toml
CARGO ?= cargo
KME := target/release/kme
KME_BENCH := target/release/kme-bench

.DEFAULT_GOAL := help
.PHONY: help build build-bench certs run start stop demo deps test fuzz lint fmt bench bench-link bench-live-link clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-16s %s\n",$$1,$$2}'

build: ## build the kme binary (release)
	$(CARGO) build --release --bin kme

build-bench: ## build the kme-bench binary (release): load generator and link bench
	$(CARGO) build --release -p kme-bench

certs: ## make the dev/test PKI for every KME and SAE of $(CONFIG) (idempotent)
	bash certs/gen.sh $(CONFIG) certs

revoke: ## revoke the dev certificate certs/$(NAME).crt and write certs/ca.crl (then reload the KMEs)
	bash certs/revoke.sh $(NAME)

run: build certs ## start the network of $(CONFIG) (default kme.toml; e.g. CONFIG=examples/ring.toml) in the foreground (Ctrl-C stops it)
	@scripts/net.sh start $(CONFIG)

start: build certs ## start the network of $(CONFIG) in the background (`make stop` stops it)
	@scripts/net.sh start $(CONFIG) --background

stop: ## stop a network started in the background, by its recorded PIDs
	@scripts/net.sh stop

demo: ## scripted SAE session with curl against the running default network
	@scripts/demo.sh

# apt as root, else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

deps: ## install what the tests need beyond Rust, if missing: Debian's chromium (the dashboard's browser test)
	@command -v $${KME_CHROMIUM:-chromium} >/dev/null 2>&1 || { 	  echo "make deps: installing chromium (Debian package) for the dashboard's browser test"; 	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

test: deps ## fmt check + clippy -D warnings + all tests (what CI runs)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) test --workspace

fuzz: ## property tests of every parser of outside bytes, long (PROPTEST_CASES, default 100000 per property; release; 15 min at most): inputs/s
	@scripts/fuzz.sh

lint: ## fmt check + clippy -D warnings
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

bench: build build-bench certs ## load benchmark (kme-bench load) on bench/kme.toml: status, direct, relayed and multicast pairs, keys/s and latency (var/bench/*.json)
	@scripts/bench.sh

bench-link: build-bench ## BB84 post-processing benchmark per QBER, unpaced (kme-bench link; var/bench/link.json)
	$(KME_BENCH) link --out var/bench/link.json

bench-live-link: build certs ## one unpaced BB84 link between two kme processes for 40 s: bit/s (var/bench/live-link.json)
	@scripts/bench-live-link.sh

clean: ## remove build output and runtime data (var/)
	$(CARGO) clean
	rm -rf var
