import Mustache

/// The dashboard's Mustache templates, CSS and script, compiled into the
/// binary (no files to install, nothing fetched from elsewhere).
enum DashboardTemplates {
    static let templates: [String: String] = [
        "header": header, "footer": footer, "login": login, "dashboard": dashboard, "live": live, "instance": instance,
        "missing": missing, "expired": expired,
    ]

    /// Every template, parsed once; a template that does not parse is a
    /// programming error caught by the dashboard's tests, and renders as a
    /// line naming it.
    static let library: MustacheLibrary = {
        var parsed: [String: MustacheTemplate] = [:]
        for (name, text) in templates {
            parsed[name] = (try? MustacheTemplate(string: text)) ?? (try? MustacheTemplate(string: "template \(name) does not parse"))
        }
        return MustacheLibrary(templates: parsed)
    }()

    static let header = """
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>Corral pool</title>
        <style>
        :root { --fg: #1d2733; --muted: #5c6b7a; --line: #d8dee6; --bg: #f6f8fa; --accent: #2f6fb3; }
        * { box-sizing: border-box; }
        body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
        header { display: flex; flex-wrap: wrap; align-items: center; gap: 12px; padding: 10px 20px; background: #18324d; color: #fff; }
        header h1 { font-size: 18px; margin: 0; flex: 1; }
        header form { margin: 0; }
        header button { background: transparent; color: #fff; border: 1px solid #8aa4bf; border-radius: 4px; padding: 3px 10px; cursor: pointer; }
        main { padding: 16px 20px; max-width: 1200px; margin: 0 auto; }
        section { background: #fff; border: 1px solid var(--line); border-radius: 6px; margin-bottom: 16px; }
        section h2 { font-size: 15px; margin: 0; padding: 10px 14px; border-bottom: 1px solid var(--line); }
        .scroll { overflow-x: auto; }
        table { border-collapse: collapse; width: 100%; }
        th, td { text-align: left; padding: 6px 14px; border-bottom: 1px solid var(--line); white-space: nowrap; vertical-align: middle; }
        th { color: var(--muted); font-weight: 600; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
        tr:last-child td { border-bottom: 0; }
        .empty { padding: 10px 14px; color: var(--muted); }
        .pill { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; font-weight: 600; background: #e8edf2; }
        .fresh, .active { background: #dcf3e3; color: #17603a; }
        .stale, .build, .shutoff, .suspended, .paused { background: #fdf1d6; color: #7a5400; }
        .disabled, .error, .deleted { background: #fbe0e0; color: #8c1c1c; }
        .bar { display: inline-block; width: 120px; height: 8px; background: #e8edf2; border-radius: 4px; overflow: hidden; vertical-align: middle; }
        .bar span { display: block; height: 100%; background: var(--accent); }
        .bars div { display: flex; align-items: center; gap: 8px; font-size: 12px; color: var(--muted); }
        .bars b { display: inline-block; width: 84px; font-weight: 500; }
        a { color: var(--accent); }
        .muted { color: var(--muted); }
        .login { max-width: 420px; margin: 60px auto; background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 20px; }
        .login input { width: 100%; padding: 8px; margin: 8px 0 12px; font: inherit; border: 1px solid var(--line); border-radius: 4px; }
        .login button { padding: 7px 16px; font: inherit; background: var(--accent); color: #fff; border: 0; border-radius: 4px; cursor: pointer; }
        .problem { color: #8c1c1c; }
        .chart { padding: 12px 14px; }
        .lane { display: grid; grid-template-columns: 150px 1fr 90px; align-items: center; gap: 10px; margin: 4px 0; font-size: 13px; }
        .track { position: relative; height: 14px; background: #eef2f6; border-radius: 3px; }
        .track span { position: absolute; top: 0; bottom: 0; background: var(--accent); border-radius: 3px; min-width: 2px; }
        @media (max-width: 640px) {
          main { padding: 10px; }
          th, td { padding: 5px 8px; }
          .bar { width: 70px; }
          .lane { grid-template-columns: 110px 1fr 70px; }
        }
        </style>
        </head>
        <body>
        <header><h1>Corral pool</h1>{{#user}}<span>{{user}}</span><form method="post" action="/ui/logout"><button type="submit">Log out</button></form>{{/user}}</header>
        <main>
        """

    static let footer = """
        </main>
        </body>
        </html>
        """

    static let login = """
        {{> header}}
        <form class="login" method="post" action="/ui/login">
        <h2>Log in</h2>
        <p class="muted">The dashboard is for superusers. Paste your API token (from <code>corral pool user add NAME --superuser</code>).</p>
        {{#error}}<p class="problem" id="problem">{{error}}</p>{{/error}}
        <label for="token">Token</label>
        <input id="token" name="token" type="password" autocomplete="current-password" required maxlength="256">
        <button type="submit" id="login">Log in</button>
        </form>
        {{> footer}}
        """

    static let expired = """
        <p class="problem">Your session ended; <a href="/ui">log in again</a>.</p>
        """

    static let missing = """
        {{> header}}
        <section><h2>No such instance</h2><p class="empty">There is no instance '{{what}}'. <a href="/ui">Back to the pool</a>.</p></section>
        {{> footer}}
        """

    static let dashboard = """
        {{> header}}
        <div id="live">{{> live}}</div>
        <script>
        (function () {
          var live = document.getElementById('live');
          if (!live || !window.EventSource || !window.fetch) return;
          var timer = null, busy = false;
          function refresh() {
            if (busy) { schedule(); return; }
            busy = true;
            fetch('/ui/live', { credentials: 'same-origin', cache: 'no-store' }).then(function (reply) {
              if (reply.status === 401) { window.location.href = '/ui'; return null; }
              return reply.text();
            }).then(function (text) {
              busy = false;
              if (typeof text === 'string') live.innerHTML = text;
            }, function () { busy = false; });
          }
          function schedule() { if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, 150); }
          var source = new EventSource('/ui/events');
          source.addEventListener('instance', schedule);
          source.addEventListener('revoked', function () { source.close(); window.location.href = '/ui'; });
          // Capacity and freshness change without instance events.
          setInterval(schedule, 15000);
        })();
        </script>
        {{> footer}}
        """

    static let live = """
        <section id="appliances"><h2>Appliances</h2>
        {{#hasAppliances}}<div class="scroll"><table>
        <tr><th>Name</th><th>State</th><th>Capacity</th><th>Last seen</th><th>Owner</th><th>Region</th></tr>
        {{#appliances}}<tr><td>{{name}}</td><td><span class="pill {{state}}">{{state}}</span></td>
        <td class="bars">{{#bars}}<div><b>{{label}}</b><span class="bar"><span style="width: {{used}}%"></span></span>{{text}}</div>{{/bars}}</td>
        <td>{{lastSeen}}</td><td>{{owner}}</td><td>{{region}}</td></tr>
        {{/appliances}}</table></div>{{/hasAppliances}}
        {{^hasAppliances}}<p class="empty">No appliances yet: <code>corral pool appliance add NAME --owner USER</code>.</p>{{/hasAppliances}}
        </section>
        <section id="instances"><h2>Instances</h2>
        {{#hasInstances}}<div class="scroll"><table>
        <tr><th>Name</th><th>Status</th><th>Owner</th><th>Appliance</th><th>Age</th><th></th></tr>
        {{#instances}}<tr data-instance="{{name}}"><td><a href="/ui/instance/{{id}}">{{name}}</a></td>
        <td><span class="pill {{statusClass}}" data-status>{{status}}</span></td><td>{{owner}}</td><td>{{appliance}}</td><td>{{age}}</td>
        <td class="muted">{{error}}</td></tr>
        {{/instances}}</table></div>{{/hasInstances}}
        {{^hasInstances}}<p class="empty">No instances.</p>{{/hasInstances}}
        {{#more}}<p class="empty">and {{more}} older ones (<code>corral pool instance list</code>).</p>{{/more}}
        </section>
        <section id="templates"><h2>Templates</h2>
        {{#hasTemplates}}<div class="scroll"><table>
        <tr><th>Name</th><th>Wisp</th><th>Flavor</th><th>Hot starts</th><th>Warm</th><th>Ready</th></tr>
        {{#templates}}<tr><td>{{name}}</td><td>{{wisp}}</td><td>{{flavor}}</td><td>{{hotStarts}}</td><td>{{warm}}</td><td>{{ready}}</td></tr>
        {{/templates}}</table></div>{{/hasTemplates}}
        {{^hasTemplates}}<p class="empty">No templates.</p>{{/hasTemplates}}
        </section>
        <p class="muted" id="updated">Updated {{updated}}</p>
        """

    static let instance = """
        {{> header}}
        {{#instance}}
        <section><h2>{{name}} <span class="pill {{statusClass}}">{{status}}</span></h2>
        <p class="empty">Owner {{owner}}, appliance {{appliance}}, {{age}} old. {{error}} <a href="/ui">Back to the pool</a>.</p>
        </section>
        {{/instance}}
        <section id="timeline"><h2>Launch timeline ({{total}} s)</h2>
        {{#hasPhases}}<div class="chart">
        {{#phases}}<div class="lane" data-phase="{{phase}}"><span>{{phase}}</span><div class="track"><span style="left: {{offset}}%; width: {{width}}%"></span></div><span class="muted">{{seconds}} s</span></div>
        {{/phases}}</div>
        <div class="scroll"><table><tr><th>Phase</th><th>At</th><th>Since request</th><th>Step</th><th>Detail</th></tr>
        {{#phases}}<tr><td>{{phase}}</td><td>{{at}}</td><td>{{seconds}} s</td><td>{{step}} s</td><td>{{detail}}</td></tr>
        {{/phases}}</table></div>{{/hasPhases}}
        {{^hasPhases}}<p class="empty">No phases recorded yet.</p>{{/hasPhases}}
        </section>
        {{> footer}}
        """
}
