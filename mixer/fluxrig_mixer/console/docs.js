// /docs: Swagger UI over the Mixer's OpenAPI document, every file served by the Mixer itself
// (api/routes_docs.py: no CDN). Opened from a console session, "Try it out" runs with the
// session cookie; state-changing calls then need the session's CSRF token (api/auth.py), read
// once here and added to each such call. A bearer token given with "Authorize" needs none.
"use strict";
(function () {
  var csrf = "";
  var ready = fetch("/api/v1/auth/session", { credentials: "same-origin" })
    .then(function (r) { return r.ok ? r.json() : {}; })
    .then(function (s) { csrf = (s && s.csrf) || ""; })
    .catch(function () { csrf = ""; });
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url") || "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    validatorUrl: null, // no badge fetched from elsewhere
    requestInterceptor: function (req) {
      var method = (req.method || "GET").toUpperCase();
      if (method === "GET" || method === "HEAD" || method === "OPTIONS") return req;
      return ready.then(function () {
        if (csrf) req.headers["X-CSRF-Token"] = csrf;
        return req;
      });
    },
  });
})();
