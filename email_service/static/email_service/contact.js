/* MedCor contact form: posts every form[data-medcor-contact] to the email API, with upload progress,
 * one Idempotency-Key per submission, errors next to their fields and the delivery status polled live.
 * The API lives at the origin of the form's action, so the same script serves the page on the API's
 * own origin and the form embedded in the website. Without this script, the form posts as plain HTML.
 */
(function () {
  "use strict";

  var API_PATH = "/api/email/emails/";
  var FINAL = ["SENT", "FAILED", "CANCELLED"];
  var STATUS_TEXT = {
    PENDING: "Queued for delivery",
    PROCESSING: "Being delivered",
    SENT: "Delivered to our support team",
    FAILED: "Could not be delivered",
    CANCELLED: "Cancelled",
  };
  var POLL_FIRST_MS = 1000;
  var POLL_MAX_MS = 5000;
  var POLL_GIVE_UP_MS = 5 * 60 * 1000;
  var IN_PROGRESS_RETRIES = 5;
  // The global each CAPTCHA provider's script defines, by the name in data-mc-captcha.
  var CAPTCHA_APIS = { turnstile: "turnstile", hcaptcha: "hcaptcha", recaptcha: "grecaptcha" };

  function newKey() {
    // crypto.randomUUID exists only in secure contexts; getRandomValues exists everywhere.
    var bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (b) {
      return (b + 0x100).toString(16).slice(1);
    }).join("");
    return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)].join("-");
  }

  function waitText(seconds) {
    if (seconds < 90) return seconds + (seconds === 1 ? " second" : " seconds");
    var minutes = Math.ceil(seconds / 60);
    if (minutes < 90) return minutes + " minutes";
    return Math.ceil(minutes / 60) + " hours";
  }

  function parseJson(text) {
    try {
      return JSON.parse(text);
    } catch (error) {
      return null;
    }
  }

  function ContactForm(form) {
    this.form = form;
    this.endpoint = new URL(API_PATH, form.action).href;
    this.sameOrigin = new URL(this.endpoint).origin === window.location.origin;
    this.fields = form.querySelector("[data-mc-fields]");
    this.submitButton = form.querySelector('button[type="submit"]');
    this.retryButton = form.querySelector("[data-mc-retry]");
    this.alert = form.querySelector("[data-mc-alert]");
    this.progressBox = form.querySelector("[data-mc-progress]");
    this.progress = this.progressBox.querySelector("progress");
    this.progressText = form.querySelector("[data-mc-progress-text]");
    this.actions = form.querySelector("[data-mc-actions]");
    this.result = form.querySelector("[data-mc-result]");
    this.live = form.querySelector("[data-mc-live]");
    this.key = null;
    this.sending = false;
    this.pollTimer = null;

    // The server's rules are the only rules: its answer is shown next to each field.
    form.noValidate = true;
    form.addEventListener("submit", this.onSubmit.bind(this));
    // Changed content is a new submission and gets a new key; a retry of the same content does not.
    form.addEventListener("input", this.forgetKey.bind(this));
    form.addEventListener("change", this.forgetKey.bind(this));
    this.retryButton.addEventListener("click", this.submit.bind(this));
    form.querySelector("[data-mc-again]").addEventListener("click", this.startOver.bind(this));
  }

  ContactForm.prototype.forgetKey = function () {
    if (!this.sending) this.key = null;
  };

  ContactForm.prototype.onSubmit = function (event) {
    event.preventDefault();
    this.submit();
  };

  ContactForm.prototype.submit = function () {
    if (this.sending) return;
    this.sending = true;
    this.key = this.key || newKey();
    this.clearErrors();
    this.submitButton.disabled = true;
    this.submitButton.textContent = "Sending…";
    this.retryButton.hidden = true;
    this.form.setAttribute("aria-busy", "true");
    this.send(IN_PROGRESS_RETRIES);
  };

  ContactForm.prototype.formData = function () {
    var data = new FormData(this.form);
    // Only the contract's fields go to the API; the key travels as a header, the CSRF token too.
    var token = data.get("csrfmiddlewaretoken");
    data.delete("csrfmiddlewaretoken");
    data.delete("idempotency_key");
    var file = data.get("file_attached");
    if (!file || !file.name) data.delete("file_attached");
    return { body: data, token: token, hasFile: Boolean(file && file.name) };
  };

  ContactForm.prototype.send = function (inProgressRetries) {
    var self = this;
    var data = this.formData();
    var xhr = new XMLHttpRequest();
    xhr.open("POST", this.endpoint);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader("Idempotency-Key", this.key);
    if (this.sameOrigin && data.token) xhr.setRequestHeader("X-CSRFToken", data.token);
    xhr.timeout = 120000;
    if (data.hasFile) {
      this.showProgress(0);
      xhr.upload.addEventListener("progress", function (event) {
        if (event.lengthComputable) self.showProgress(event.loaded / event.total);
      });
      xhr.upload.addEventListener("load", function () { self.showProgress(1); });
    } else {
      this.progressBox.hidden = true;
    }
    xhr.addEventListener("load", function () {
      var retryAfter = xhr.getResponseHeader("Retry-After");
      self.onAnswer(xhr.status, parseJson(xhr.responseText), retryAfter, inProgressRetries);
    });
    xhr.addEventListener("error", this.onNetworkFailure.bind(this));
    xhr.addEventListener("timeout", this.onNetworkFailure.bind(this));
    xhr.send(data.body);
  };

  ContactForm.prototype.showProgress = function (fraction) {
    var percent = Math.round(fraction * 100);
    this.progressBox.hidden = false;
    this.progress.value = percent;
    this.progressText.textContent = percent === 100 ? "Upload complete" : percent + "%";
  };

  ContactForm.prototype.done = function () {
    this.sending = false;
    this.progressBox.hidden = true;
    this.submitButton.disabled = false;
    this.submitButton.textContent = "Send message";
    this.form.removeAttribute("aria-busy");
  };

  ContactForm.prototype.onAnswer = function (status, body, retryAfter, inProgressRetries) {
    if (status === 200 || status === 201) return this.onAccepted(body);
    if (status === 409 && inProgressRetries > 0) {
      // The same submission is still being stored (a retry raced the first try): ask again.
      window.setTimeout(this.send.bind(this, inProgressRetries - 1), 1000);
      return;
    }
    this.done();
    // A token is good for one check: after any answer that may have spent it, get a new one. Not
    // after a 429 (refused before any check) nor a network failure, whose retry must send the
    // same body for its Idempotency-Key to match.
    if (status !== 429) this.resetCaptcha();
    if (status === 400 && body) return this.showFieldErrors(body);
    if (status === 429) {
      var seconds = parseInt(retryAfter, 10) || 60;
      this.submitButton.disabled = true;
      window.setTimeout(function () { this.submitButton.disabled = false; }.bind(this), seconds * 1000);
      return this.showAlert(["You have sent several messages in a short time. Please try again in " +
        waitText(seconds) + "."]);
    }
    if (status === 413) {
      return this.showFieldErrors({ file_attached: ["The file is too large to upload."] });
    }
    if (status === 422) this.key = null;
    var detail = body && body.detail ? [body.detail] : [];
    this.showAlert(["Something went wrong on our side (error " + status + "). Your message was not sent."]
      .concat(detail), true);
  };

  ContactForm.prototype.onNetworkFailure = function () {
    this.done();
    // The key is kept: if the first try did reach us, the retry answers with its result.
    this.showAlert(["We could not reach our server. Check your connection, then press Retry; " +
      "your message will not be sent twice."], true);
  };

  ContactForm.prototype.onAccepted = function (body) {
    this.done();
    this.key = null;
    this.fields.hidden = true;
    this.actions.hidden = true;
    this.result.hidden = false;
    this.result.querySelector("[data-mc-reference]").textContent = body.email_request_id;
    this.showStatus(body.status);
    this.live.textContent = "Thank you, we have your message. Your reference is " + body.email_request_id +
      ". Status: " + (STATUS_TEXT[body.status] || body.status) + ".";
    this.result.querySelector("h2").focus();
    this.poll(body.email_request_id, POLL_FIRST_MS, Date.now(), body.status);
  };

  ContactForm.prototype.showStatus = function (status) {
    var element = this.result.querySelector("[data-mc-status]");
    element.textContent = STATUS_TEXT[status] || status;
    element.setAttribute("data-status", status);
  };

  ContactForm.prototype.poll = function (id, delay, startedAt, lastStatus) {
    var self = this;
    if (FINAL.indexOf(lastStatus) !== -1 || Date.now() - startedAt > POLL_GIVE_UP_MS) return;
    this.pollTimer = window.setTimeout(function () {
      fetch(self.endpoint + encodeURIComponent(id) + "/", {
        credentials: "omit",
        headers: { Accept: "application/json" },
      })
        .then(function (response) {
          if (response.status === 404) return { stop: true };
          if (response.status === 429) {
            return { wait: (parseInt(response.headers.get("Retry-After"), 10) || 10) * 1000 };
          }
          return response.ok ? response.json() : {};
        })
        .catch(function () { return {}; })
        .then(function (item) {
          if (item.stop) return;
          var status = item.status || lastStatus;
          if (item.status && item.status !== lastStatus) {
            self.showStatus(status);
            self.live.textContent = "Status of your message: " + (STATUS_TEXT[status] || status) + ".";
          }
          self.poll(id, item.wait || Math.min(delay * 1.5, POLL_MAX_MS), startedAt, status);
        });
    }, delay);
  };

  ContactForm.prototype.resetCaptcha = function () {
    var box = this.form.querySelector("[data-mc-captcha]");
    var api = box && window[CAPTCHA_APIS[box.getAttribute("data-mc-captcha")]];
    if (!api || typeof api.reset !== "function") return;
    try {
      // Turnstile is told which widget by its element; hCaptcha and reCAPTCHA reset their first.
      if (box.getAttribute("data-mc-captcha") === "turnstile") api.reset(box.firstElementChild);
      else api.reset();
    } catch (error) {
      // A widget that is not rendered yet has nothing to reset.
    }
  };

  ContactForm.prototype.startOver = function () {
    window.clearTimeout(this.pollTimer);
    this.form.reset();
    this.resetCaptcha();
    this.key = null;
    this.clearErrors();
    this.progressBox.hidden = true;
    this.result.hidden = true;
    this.fields.hidden = false;
    this.actions.hidden = false;
    this.live.textContent = "";
    this.form.querySelector("input:not([type=hidden]), textarea").focus();
  };

  ContactForm.prototype.clearErrors = function () {
    this.alert.hidden = true;
    this.alert.textContent = "";
    Array.prototype.forEach.call(this.form.querySelectorAll("[data-error-for]"), function (element) {
      element.hidden = true;
      element.textContent = "";
      element.parentNode.classList.remove("mc-field--invalid");
      var input = element.parentNode.querySelector("input, textarea");
      if (input) input.removeAttribute("aria-invalid");
    });
  };

  ContactForm.prototype.showAlert = function (messages, offerRetry) {
    var alert = this.alert;
    alert.textContent = "";
    alert.hidden = false;
    messages.forEach(function (message) {
      var paragraph = document.createElement("p");
      paragraph.textContent = message;
      alert.appendChild(paragraph);
    });
    this.retryButton.hidden = !offerRetry;
  };

  ContactForm.prototype.showFieldErrors = function (errors) {
    var form = this.form;
    var others = [];
    var first = null;
    Object.keys(errors).forEach(function (name) {
      var messages = [].concat(errors[name]).map(String).filter(function (message, index, all) {
        return all.indexOf(message) === index;
      });
      var element = form.querySelector('[data-error-for="' + name + '"]');
      if (!element) {
        others = others.concat(messages);
        return;
      }
      element.textContent = messages.join(" ");
      element.hidden = false;
      element.parentNode.classList.add("mc-field--invalid");
      // The CAPTCHA's box has no input of ours to mark.
      var input = element.parentNode.querySelector("input:not([type=hidden]), textarea");
      if (input) input.setAttribute("aria-invalid", "true");
      first = first || input;
    });
    this.showAlert(["Your message was not sent. Please correct the fields marked below."].concat(others));
    if (first) first.focus();
  };

  function start() {
    Array.prototype.forEach.call(document.querySelectorAll("form[data-medcor-contact]"), function (form) {
      if (!form.medcorContact) form.medcorContact = new ContactForm(form);
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
