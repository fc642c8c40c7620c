# provision: the two commands of the README are `make demo` and `make test`; both install what a fresh machine lacks.
GO     ?= go
BIN    := bin/provision
export CGO_ENABLED := 1

.PHONY: all deps build demo test test-short fuzz bench vet clean

all: build

deps:
	@bash scripts/deps.sh

build: deps
	$(GO) build -trimpath -o $(BIN) ./cmd/provision

# A throw-away station, sample golden images, three units provisioned end to end on the in-process TPM simulator.
demo: build
	@$(BIN) demo

# Everything CI runs: vet, then all tests with the race detector, integration tests included (swtpm, OpenSSL's tpm2
# provider, mosquitto, tmux). Under CI=true a missing tool fails instead of skipping.
test: deps
	$(GO) vet ./...
	$(GO) test -race -timeout 40m ./...

test-short: deps
	$(GO) test -short ./...

# Each fuzz target for a short while (FUZZTIME=1m for longer).
FUZZTIME ?= 20s
fuzz: deps
	@bash scripts/fuzz.sh $(FUZZTIME)

bench: build
	$(GO) test -run '^$$' -bench . -benchmem ./...
	bash bench/enroll.sh
	bash bench/inject.sh
	bash bench/batch.sh
	bash bench/central.sh

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l .)" || { gofmt -l .; exit 1; }

clean:
	rm -rf bin bench/out
