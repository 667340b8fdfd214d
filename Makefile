# Thin wrappers. The two that matter: `make run` and `make test`.
.PHONY: run test lint fmt conformance real-clients migrate build release bench

run:            ## Relay embedded (all five services, SQLite, demo route) on http://127.0.0.1:8080
	cargo run --bin relay -- serve --config deploy/config/relay.dev.toml

test:           ## every test: unit, component, end-to-end (starts NATS/Redis/Postgres), compose check, conformance
	bash scripts/test.sh

bench:          ## Relay in every mode beside a bare reverse proxy, everything on: a markdown table (bench.md)
	bash scripts/bench.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

conformance:    ## the shared conformance suite against a fresh embedded relay (SUITE=<dir> to pick a copy)
	bash scripts/conformance.sh $(ARGS)

real-clients:   ## Claude Code and Codex CLI through Relay on the OpenAI, Anthropic and Gemini routes of the mock
	bash scripts/real-clients.sh

migrate:        ## apply migrations to $$RELAY__DATABASE__URL
	cargo run --bin relay -- migrate

build:
	cargo build --workspace

release:
	cargo build --release --bin relay
