"""The page in a real browser (Debian's Chromium via Playwright) against a real uvicorn serving
the default bundle: what a person sees for a Fashion-MNIST item, an MNIST digit, a text file and
several files at once, by mouse, drag-and-drop, paste, keyboard, and at phone width.

Every state is saved as a screenshot under test-artifacts/page/ (gitignored).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.page.conftest import Sample, Samples, Tab, file_payload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Builds File objects in the page and hands them over as a drop or a paste would.
DISPATCH = """([kind, files]) => {
  const dt = new DataTransfer();
  for (const f of files) dt.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: f.type}));
  if (kind === "drop") {
    const zone = document.getElementById("drop");
    for (const type of ["dragenter", "dragover", "drop"]) {
      zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
    }
  } else {
    document.body.dispatchEvent(new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true}));
  }
}"""

# WCAG contrast ratio of an element's text against the first opaque background behind it.
CONTRAST = """(el) => {
  const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
  const lum = ([r, g, b]) => {
    const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  let bg = null;
  for (let e = el; e && !bg; e = e.parentElement) {
    const c = rgb(getComputedStyle(e).backgroundColor);
    if (c.length === 3 || c[3] === 1) bg = c.slice(0, 3);
  }
  bg = bg || [255, 255, 255];
  const a = lum(rgb(getComputedStyle(el).color).slice(0, 3)), b = lum(bg);
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


def cards(tab: Tab) -> Any:
    return tab.page.locator("#results > li")


def served(result: dict[str, Any]) -> tuple[str, float]:
    """What the page draws against the threshold: the served `score` where the bundle serves
    one (the default bundle: Mahalanobis), else `min_distance`."""
    if "score" in result:
        return "score", result["score"]
    return "distance", result["min_distance"]


def expect_result(card: Any, sample: Sample, top_k: int = 3) -> None:
    """The card shows what the API says about this image, in words a person reads."""
    r = sample.result
    expect(card).not_to_have_attribute("aria-busy", "true")
    expect(card.locator("h3")).to_have_text(sample.name)
    badge = "Out of distribution" if r["is_ood"] else "In distribution"
    expect(card.locator(".badge-text")).to_have_text(badge)
    expect(card.locator(".class-label")).to_have_text(r["label"])
    expect(card.locator(".topk li")).to_have_count(top_k)
    expect(card.locator(".topk li").first.locator(".topk-label")).to_have_text(r["label"])
    text = card.locator(".distance-text")
    side = "over" if r["is_ood"] else "under"  # the default bundle's score: lower = in
    noun, value = served(r)
    expect(text).to_contain_text(
        f"{noun.capitalize()} {value:.3f} is "
        f"{abs(value - r['threshold']):.3f} {side} the {r['label']} threshold "
        f"{r['threshold']:.3f}."
    )
    expect(card.locator("img")).to_have_attribute("alt", f"Preview of {sample.name}")
    # An axis of a few labels, whatever the score's range (min_distance 0-2, Mahalanobis 0-700).
    assert 2 <= card.locator(".scale-below .axis").count() <= 8
    # The bar: the marker is right of the threshold exactly when the image is OOD.
    marker = card.locator(".marker").bounding_box()
    threshold = card.locator(".threshold").bounding_box()
    assert marker is not None and threshold is not None
    assert (marker["x"] > threshold["x"]) == r["is_ood"]


def shot(tab: Tab, artifacts: Path, name: str) -> None:
    tab.page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def test_a_fashion_item_shows_its_class_and_the_in_distribution_badge(
    tab: Tab, samples: Samples, artifacts: Path
) -> None:
    tab.open()
    shot(tab, artifacts, "desktop-empty")
    tab.page.set_input_files("#files", samples.fashion.path)
    card = cards(tab).first
    expect_result(card, samples.fashion)
    expect(card.locator(".badge")).to_have_class("badge in")
    r = samples.fashion.result
    noun, value = served(r)
    expect(tab.page.locator("#status")).to_have_text(
        f"{samples.fashion.name}: {r['label']}, in distribution "
        f"({noun} {value:.3f}, threshold {r['threshold']:.3f})."
    )
    expect(tab.page.locator("#model-info")).to_contain_text("a threshold per predicted class")
    shot(tab, artifacts, "desktop-in-distribution")
    tab.assert_clean()


def test_an_mnist_digit_shows_the_out_of_distribution_badge(
    tab: Tab, samples: Samples, artifacts: Path
) -> None:
    tab.open()
    tab.page.set_input_files("#files", samples.digit.path)
    card = cards(tab).first
    expect_result(card, samples.digit)
    expect(card.locator(".badge")).to_have_class("badge out")
    expect(card.locator(".distance-text")).to_contain_text("It stays out")
    shot(tab, artifacts, "desktop-out-of-distribution")
    tab.assert_clean()


def test_a_text_file_and_a_too_large_image_show_readable_errors(
    tab: Tab, samples: Samples, artifacts: Path
) -> None:
    assert samples.text_refusal[0] == 415, samples.text_refusal
    assert samples.big_refusal[0] == 413, samples.big_refusal
    tab.open()
    tab.page.set_input_files("#files", [samples.text, samples.big])
    for card, (_, detail), title in zip(
        (cards(tab).nth(0), cards(tab).nth(1)),
        (samples.text_refusal, samples.big_refusal),
        ("Not an image.", "Too large."),
        strict=True,
    ):
        expect(card.locator(".badge-text")).to_have_text("Error")
        expect(card.locator(".error-title")).to_have_text(title)
        expect(card.locator(".error-detail")).to_have_text(f"The service said: {detail}")
    expect(tab.page.locator("#status")).to_have_text(
        "notes.txt: error. Not an image. noise.png: error. Too large."
    )
    shot(tab, artifacts, "desktop-errors")
    tab.assert_clean(http_errors=(415, 413))


def test_several_files_at_once_by_picker_drop_and_paste_show_one_result_each(
    tab: Tab, samples: Samples, artifacts: Path
) -> None:
    tab.open()
    page = tab.page
    page.set_input_files("#files", [samples.fashion.path, samples.digit.path, samples.text])
    expect(cards(tab)).to_have_count(3)
    expect_result(cards(tab).nth(0), samples.fashion)
    expect_result(cards(tab).nth(1), samples.digit)
    expect(cards(tab).nth(2).locator(".badge-text")).to_have_text("Error")
    shot(tab, artifacts, "desktop-several")

    fashion = file_payload(samples.fashion.path, "image/png")
    digit = file_payload(samples.digit.path, "image/png")
    page.evaluate(DISPATCH, ["drop", [digit, fashion]])
    expect(cards(tab)).to_have_count(5)
    expect_result(cards(tab).nth(0), samples.digit)  # newest first, in the order dropped
    expect_result(cards(tab).nth(1), samples.fashion)
    page.evaluate(DISPATCH, ["paste", [fashion]])
    expect(cards(tab)).to_have_count(6)
    expect_result(cards(tab).nth(0), samples.fashion)

    # Text and verdicts are readable: WCAG AA contrast (4.5:1) for every kind of text shown.
    for selector in ("h1", ".top p", "#model-info", ".badge.in", ".badge.out", ".badge.error",
                     "button.primary", ".class-label", ".distance-text", ".topk-value",
                     ".thr-label", ".error-detail", ".scale-below .axis"):  # fmt: skip
        ratio = page.locator(selector).first.evaluate(CONTRAST)
        assert ratio >= 4.5, (selector, ratio)
    tab.assert_clean(http_errors=(415,))


def test_keyboard_alone_operates_the_page(tab: Tab, samples: Samples, artifacts: Path) -> None:
    page = tab.page
    # Intercepting the file chooser is switched on asynchronously when a listener is added:
    # add one now, long before Enter is pressed, so the dialog cannot open un-intercepted.
    page.on("filechooser", lambda chooser: None)
    tab.open()
    # Controls are labelled, the results region is live.
    expect(page.get_by_label("Model")).to_have_id("model")
    expect(page.get_by_label("Classes listed")).to_have_id("topk")
    expect(page.locator("#status")).to_have_attribute("aria-live", "polite")

    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    assert order == ["skip", "model", "topk", "choose"], order

    page.keyboard.press("Shift+Tab")  # back to "Classes listed", from 3 down to 1
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    expect(page.locator("#topk")).to_have_value("1")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "choose"
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(samples.digit.path)
    expect_result(cards(tab).first, samples.digit, top_k=1)
    assert page.evaluate("document.activeElement.id") == "choose"  # focus was not stolen
    expect(page.locator("#status")).to_contain_text("out of distribution")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "clear"
    shot(tab, artifacts, "desktop-keyboard-focus")
    page.keyboard.press("Enter")
    expect(cards(tab)).to_have_count(0)
    expect(page.locator("#status")).to_have_text("Results cleared.")
    assert page.evaluate("document.activeElement.id") == "results-heading"
    tab.assert_clean()


def test_phone_width_fits_without_sideways_scrolling(
    phone_tab: Tab, samples: Samples, artifacts: Path
) -> None:
    tab = phone_tab
    tab.open()
    tab.page.set_input_files("#files", [samples.fashion.path, samples.digit.path])
    expect_result(cards(tab).nth(0), samples.fashion)
    expect_result(cards(tab).nth(1), samples.digit)
    width = tab.page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    for label in tab.page.locator(".mark-label, .thr-label").all():
        box = label.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width[1]
    shot(tab, artifacts, "phone")
    tab.assert_clean()
