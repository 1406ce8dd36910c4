import Foundation
import PoolAPI
import Testing
import TestSupport
import AsyncHTTPClient

@Suite("End to end: users mean access, and warm hand-outs are re-keyed, in real Debian guests")
struct SharingEndToEndTests {
    @Test(
        "a user granted an instance logs in with their own key, no reboot, until taken off; a warm instance handed to a user takes their key and user-data and refuses the template owner's"
    )
    func sharingAndHandOut() async throws {
        let image = try await DebianImage.build()
        let extra = ["debian.qcow2": image.rootfs, "debian-vmlinuz": image.kernel, "debian-initrd.img": image.initrd]
        let first = Int.random(in: 30_000...36_000)
        let ports = first...first + 20
        let settings = "[warm_pools]\ninterval_seconds = 2\n"
        try await withHarness("share", bootTimeout: 180, sshForwardPorts: ports, extraFiles: extra, poolSettings: settings) { harness, base in
            var names: [String] = []
            do {
                var tokens = ["alice": harness.userToken, "root": try await harness.poolCommand(["user", "add", "root", "--superuser"])]
                var keys: [String: String] = [:]
                for user in ["alice", "bob", "carol", "tom"] {
                    // A user grants access only to the users they manage: alice manages bob.
                    if user != "alice" {
                        tokens[user] = try await harness.poolCommand(["user", "add", user] + (user == "bob" ? ["--manager", "alice"] : []))
                    }
                    let key = harness.directory.appendingPathComponent("id_\(user)").path
                    let keygen = try await runProgram("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "corral-\(user)", "-f", key])
                    #expect(keygen.status == 0, "\(keygen.stderr)")
                    keys[user] = key
                }
                // tom's key is only in his wisp; the others add theirs through the API.
                for user in ["alice", "bob", "carol"] {
                    let line = try String(contentsOfFile: try #require(keys[user]) + ".pub", encoding: .utf8)
                    _ = try await harness.v1(.POST, "/v1/ssh-key", body: ["name": user, "public-key": line], token: tokens[user])
                }
                try await image.addToCatalogue(harness, base: base)
                // tom's template keeps one warm instance, booted with his key.
                try await harness.poolCommand([
                    "wisp", "add", "tom-web", "--owner", "tom", "--image", "debian", "--ssh-key-file", try #require(keys["tom"]) + ".pub",
                ])
                try await harness.poolCommand(["template", "add", "web", "--wisp", "tom-web", "--flavor", "debian", "--hot-starts", "1"])
                try await harness.startAgent()

                // alice's own instance; bob has no access yet.
                let created = try await harness.v1(
                    .POST, "/v1/server-instance", body: ["server-image": "debian", "server-flavor": "debian", "ssh-keys": ["alice"]])
                let id = try #require(created["id"] as? String)
                names.append(try #require(created["hostname"] as? String))
                try await harness.waitForStatus(id, "ACTIVE", timeout: .seconds(300))
                let endpoint = try await sshEndpoint(harness, id)
                #expect(endpoint.user == "debian")
                let alice = GuestShell(key: try #require(keys["alice"]), port: endpoint.port)
                let bob = GuestShell(key: try #require(keys["bob"]), port: endpoint.port)
                try await alice.waitUntilReachable(timeout: .seconds(240))
                // The console route shows the guest's boot lines, as its appliance last reported them.
                var lines: [String] = []
                let consoleDeadline = ContinuousClock.now + .seconds(120)
                while ContinuousClock.now < consoleDeadline {
                    var request = HTTPClientRequest(url: harness.poolURL + "/v1/server-instance/\(id)/console?lines=20")
                    request.headers.add(name: "X-Auth-Token", value: harness.userToken)
                    let response = try await harness.http.execute(request, timeout: .seconds(30))
                    let body = try await response.body.collect(upTo: 1 << 20)
                    let envelope = try JSONSerialization.jsonObject(with: Data(body.readableBytesView)) as? [String: Any]
                    lines = envelope?["data"] as? [String] ?? []
                    if lines.contains(where: Self.isBootLine) { break }
                    try await Task.sleep(for: .seconds(1))
                }
                #expect(lines.contains(where: Self.isBootLine), "\(lines)")
                #expect(try await bob.run("true", timeout: 20).status != 0, "bob logged in before he was granted access")
                #expect(await isRefused { try await harness.v1(.GET, "/v1/server-instance/\(id)", token: tokens["bob"]) })

                // Granted: bob sees it and logs in with his own key, without a reboot.
                let bootID = try await alice.run("cat /proc/sys/kernel/random/boot_id").stdout
                try await harness.v1(
                    .PUT, "/v1/server-instance/\(id)", body: ["task": ["what": "modify-users", "how": "add", "users": ["bob"]]])
                let seen = try await harness.v1(.GET, "/v1/server-instance/\(id)", token: tokens["bob"])
                #expect(seen["id"] as? String == id)
                try await bob.waitUntilReachable(timeout: .seconds(120))
                #expect(try await bob.run("cat /proc/sys/kernel/random/boot_id").stdout == bootID, "no reboot")
                let held = try await alice.run("cat ~/.ssh/authorized_keys").stdout
                #expect(held.contains("corral-alice") && held.contains("corral-bob"), "\(held)")

                // Taken off: his key no longer logs in; alice's still does.
                try await harness.v1(
                    .PUT, "/v1/server-instance/\(id)", body: ["task": ["what": "modify-users", "how": "delete", "users": ["bob"]]])
                try await waitUntilRefused(bob, timeout: .seconds(120))
                #expect(try await alice.run("true").status == 0)
                #expect(await isRefused { try await harness.v1(.GET, "/v1/server-instance/\(id)", token: tokens["bob"]) })

                // carol launches from tom's template once its warm instance is ready.
                let warm = try await waitForReadyWarm(harness, template: "web", superuser: try #require(tokens["root"]))
                let script = "#!/bin/sh\necho \"carol's user-data ran on $(hostname)\" > /var/tmp/carol\n"
                let launched = try await harness.v1(
                    .POST, "/v1/server-instance", body: ["server-template": "web", "user-data": script], token: tokens["carol"])
                let carolID = try #require(launched["id"] as? String)
                #expect(launched["hostname"] as? String == warm, "the warm instance was handed out")
                names.append(warm)
                try await harness.waitForStatus(carolID, "ACTIVE", timeout: .seconds(120), token: tokens["carol"])
                let carolEndpoint = try await sshEndpoint(harness, carolID, token: tokens["carol"])
                let carol = GuestShell(key: try #require(keys["carol"]), port: carolEndpoint.port)
                let tom = GuestShell(key: try #require(keys["tom"]), port: carolEndpoint.port)
                // ACTIVE means her key is in: the first try logs in.
                #expect(try await carol.run("true", timeout: 30).status == 0)
                #expect(try await tom.run("true", timeout: 20).status != 0, "the template owner's key still logs in")
                var ran = ""
                let deadline = ContinuousClock.now + .seconds(60)
                while ContinuousClock.now < deadline {
                    ran = try await carol.run("cat /var/tmp/carol 2>/dev/null").stdout
                    if !ran.isEmpty { break }
                    try await Task.sleep(for: .seconds(1))
                }
                #expect(ran == "carol's user-data ran on \(warm)\n")
                let placed = try await harness.v1Data(.GET, "/v1/server-instance/\(carolID)/timeline", token: tokens["carol"])
                #expect(placed.contains { ($0["detail"] as? String)?.hasPrefix("a warm instance") == true }, "\(placed)")
            } catch {
                let consoles = names.map { name in
                    let text = (try? String(contentsOfFile: harness.consolePath(name), encoding: .utf8)) ?? "(no console log)"
                    return "--- console tail of \(name) ---\n"
                        + text.replacingOccurrences(of: "\r", with: "").split(separator: "\n").suffix(40).joined(separator: "\n")
                }
                throw SetupError("\(error)\n\(consoles.joined(separator: "\n"))")
            }
        }
    }

    /// A line systemd or cloud-init prints while the guest boots.
    static func isBootLine(_ line: String) -> Bool {
        line.contains("Cloud-init v.") || line.contains("Reached target") || line.contains("Started")
    }

    struct Endpoint {
        var port: Int
        var user: String?
    }

    /// The instance's `ssh` as the API shows it, once it does.
    func sshEndpoint(_ harness: Harness, _ id: String, token: String? = nil) async throws -> Endpoint {
        let deadline = ContinuousClock.now + .seconds(60)
        var shown: [String: Any] = [:]
        while ContinuousClock.now < deadline {
            shown = try await harness.v1(.GET, "/v1/server-instance/\(id)", token: token)
            if let ssh = shown["ssh"] as? [String: Any], let port = ssh["port"] as? Int, ssh["host"] as? String == "127.0.0.1" {
                return Endpoint(port: port, user: ssh["user"] as? String)
            }
            try await Task.sleep(for: .milliseconds(500))
        }
        throw SetupError("instance \(id) shows no ssh endpoint: \(shown)")
    }

    /// Waits until the key no longer logs in.
    func waitUntilRefused(_ shell: GuestShell, timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if try await shell.run("true", timeout: 20).status != 0 { return }
            try await Task.sleep(for: .seconds(1))
        }
        throw SetupError("the key \(shell.key) still logs in after \(timeout)")
    }

    /// Whether the request failed with a 404 (the caller does not see it).
    func isRefused(_ request: () async throws -> [String: Any]) async -> Bool {
        do {
            _ = try await request()
            return false
        } catch {
            return "\(error)".contains("404")
        }
    }

    /// The name of the template's warm instance once its SSH server answered.
    func waitForReadyWarm(_ harness: Harness, template: String, superuser: String) async throws -> String {
        let deadline = ContinuousClock.now + .seconds(400)
        var last: [[String: Any]] = []
        while ContinuousClock.now < deadline {
            let json = try await harness.poolCommand(["instance", "list", "--json"])
            last = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [[String: Any]] ?? []
            if let warm = last.first(where: { $0["template"] as? String == template && $0["warm"] as? Bool == true && $0["state"] as? Int == 4 }),
                let name = warm["name"] as? String, let id = warm["id"] as? String
            {
                // Warm instances show only to superusers.
                let timeline = try await harness.v1Data(.GET, "/v1/server-instance/\(id)/timeline", token: superuser)
                if timeline.contains(where: { $0["phase"] as? String == LaunchPhase.sshReachable.rawValue }) { return name }
            }
            try await Task.sleep(for: .seconds(1))
        }
        throw SetupError("no warm instance of \(template) became ready: \(last)")
    }
}
