import Foundation
import Libvirt
import NIOHTTP1
import PoolAPI
import Testing
import TestSupport

/// The Debian guest `cloud-init/build-debian-image` builds (cached on the
/// machine by its recipe's hash).
struct DebianImage: Sendable {
    var rootfs: URL
    var rootfsSHA256: String
    var kernel: URL
    var kernelSHA256: String
    var initrd: URL
    var initrdSHA256: String

    /// Builds it (about 100 s the first time) or finds it in the cache.
    static func build() async throws -> DebianImage {
        let script = Paths.packageRoot.appendingPathComponent("cloud-init/build-debian-image")
        let result = try await runProgram(script.path, [])
        guard result.status == 0 else { throw SetupError("cloud-init/build-debian-image failed:\n\(result.stderr)") }
        var found: [String: (URL, String)] = [:]
        for line in result.stdout.split(separator: "\n") {
            let words = line.split(separator: " ").map(String.init)
            guard words.count == 4, words[2] == "sha256" else { continue }
            found[words[0]] = (URL(fileURLWithPath: words[1]), words[3])
        }
        guard let rootfs = found["image"], let kernel = found["kernel"], let initrd = found["initrd"] else {
            throw SetupError("cloud-init/build-debian-image printed no image, kernel and initrd lines:\n\(result.stdout)")
        }
        return DebianImage(
            rootfs: rootfs.0, rootfsSHA256: rootfs.1, kernel: kernel.0, kernelSHA256: kernel.1, initrd: initrd.0, initrdSHA256: initrd.1)
    }
}

extension DebianImage {
    /// Adds the flavor `debian` (1 vCPU, 768 MiB, 3 GiB) and this image as
    /// `debian` (login user `debian`), served at `base`, to the harness's pool.
    func addToCatalogue(_ harness: Harness, base: String) async throws {
        try await harness.poolCommand(["flavor", "add", "debian", "--vcpus", "1", "--memory-mib", "768", "--disk-gib", "3"])
        try await harness.poolCommand([
            "image", "add", "debian", "--login-user", "debian", "--url", "\(base)/debian.qcow2", "--sha256", rootfsSHA256,
            "--kernel-url", "\(base)/debian-vmlinuz", "--kernel-sha256", kernelSHA256,
            "--initrd-url", "\(base)/debian-initrd.img", "--initrd-sha256", initrdSHA256,
        ])
    }
}

/// `ssh` to a guest through its loopback port forward, as the image's
/// default user, with the generated key; never to any other address.
struct GuestShell: Sendable {
    let key: String
    let port: Int

    func run(_ command: String, timeout: Int = 60) async throws -> CommandResult {
        try await runProgram(
            "timeout",
            [
                "\(timeout)", "ssh", "-i", key, "-p", "\(port)", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "debian@127.0.0.1", command,
            ])
    }

    /// Waits until SSH logs in; returns when it did.
    @discardableResult
    func waitUntilReachable(timeout: Duration) async throws -> ContinuousClock.Instant {
        let deadline = ContinuousClock.now + timeout
        var last = ""
        while ContinuousClock.now < deadline {
            let result = try await run("true", timeout: 15)
            if result.status == 0 { return .now }
            last = result.stderr
            try await Task.sleep(for: .seconds(1))
        }
        throw SetupError("ssh to 127.0.0.1:\(port) did not succeed within \(timeout): \(last)")
    }
}

@Suite("End to end: pool, agent, libvirt and a Debian guest with cloud-init")
struct EndToEndTests {
    @Test("a user asks the pool for a VM, logs in with their key through a loopback forward, finds the post-create marker")
    func debianGuest() async throws {
        let image = try await DebianImage.build()
        let reports = GuestReports()
        let extra = ["debian.qcow2": image.rootfs, "debian-vmlinuz": image.kernel, "debian-initrd.img": image.initrd]
        let first = Int.random(in: 23_000...29_000)
        let ports = first...first + 20
        try await withHarness("e2e", bootTimeout: 180, sshForwardPorts: ports, extraFiles: extra, reports: reports) { harness, base in
            var name = ""
            do {
                let key = harness.directory.appendingPathComponent("id_ed25519").path
                let keygen = try await runProgram("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-C", "corral-e2e", "-f", key])
                #expect(keygen.status == 0, "\(keygen.stderr)")
                // The script writes a marker, then tries the host's loopback services
                // (QEMU's user-mode NAT takes the guest's 10.0.2.2 to the host's
                // 127.0.0.1): the image server and the pool. The agent's nftables
                // table must refuse both.
                let port = try #require(URL(string: base)?.port)
                let script = harness.directory.appendingPathComponent("post-create.sh")
                try """
                    #!/bin/sh
                    echo "made by corral for $(hostname)" > /var/tmp/corral-marker
                    for url in "http://10.0.2.2:\(port)/report/$(hostname)" "http://10.0.2.2:\(harness.port)/openapi.yaml"; do
                        if curl -m 20 -fsS -o /dev/null -X POST "$url"; then echo reached; else echo "refused $?"; fi
                    done > /var/tmp/corral-host
                    # Later the test asks for a console flood (10 MiB), which only root can write.
                    setsid sh -c 'while [ ! -e /var/tmp/corral-flood ]; do sleep 1; done; dd if=/dev/zero of=/dev/ttyS0 bs=64k count=160' >/dev/null 2>&1 </dev/null &
                    """.write(to: script, atomically: true, encoding: .utf8)
                try await image.addToCatalogue(harness, base: base)
                try await harness.poolCommand([
                    "wisp", "add", "e2e", "--owner", "alice", "--image", "debian", "--post-create-file", script.path, "--default",
                ])
                try await harness.startAgent()

                // The user's own path: her key and her user-data through the API (the wisp has no key).
                let added = try await harness.v1(
                    .POST, "/v1/ssh-key", body: ["name": "e2e", "public-key": try String(contentsOfFile: key + ".pub", encoding: .utf8)])
                #expect((added["fingerprint"] as? String)?.hasPrefix("SHA256:") == true)
                let userData = "#!/bin/sh\necho \"user-data ran after $(cat /var/tmp/corral-marker)\" > /var/tmp/corral-user-data\n"
                let created = try await harness.v1(
                    .POST, "/v1/server-instance",
                    body: ["server-image": "debian", "server-flavor": "debian", "ssh-keys": ["e2e"], "user-data": userData])
                let id = try #require(created["id"] as? String)
                name = try #require(created["hostname"] as? String)
                let active = try await harness.waitForStatus(id, "ACTIVE", timeout: .seconds(300))
                #expect(active["private-ip"] as? String == "10.0.2.15")
                let record = try #require(try await harness.poolInstance(name))
                #expect(record["appliance"] as? String == "rack")
                #expect(record["state"] as? Int == 4)

                let sshPort = try #require(try await harness.agentStatus(name)?["ssh_port"] as? Int)
                #expect(ports.contains(sshPort))
                let shell = GuestShell(key: key, port: sshPort)
                try await shell.waitUntilReachable(timeout: .seconds(240))
                let status = try await shell.run("cloud-init status --wait", timeout: 240)
                #expect(status.stdout.contains("status: done"), "cloud-init: \(status.stdout) \(status.stderr)")
                let marker = try await shell.run("cat /var/tmp/corral-marker")
                #expect(marker.stdout == "made by corral for \(name)\n")
                // The user-data ran, after the wisp's post-create part.
                let ran = try await shell.run("cat /var/tmp/corral-user-data")
                #expect(ran.stdout == "user-data ran after made by corral for \(name)\n", "\(ran.stdout) \(ran.stderr)")
                // The API says where to connect, and `corral instances ssh` logs in with it.
                var shown: [String: Any] = [:]
                let sshDeadline = ContinuousClock.now + .seconds(60)
                while shown["ssh"] == nil, ContinuousClock.now < sshDeadline {
                    shown = try await harness.v1(.GET, "/v1/server-instance/\(id)")
                    if shown["ssh"] == nil { try await Task.sleep(for: .milliseconds(500)) }
                }
                let endpoint = try #require(shown["ssh"] as? [String: Any], "\(shown)")
                #expect(endpoint["host"] as? String == "127.0.0.1")
                #expect(endpoint["port"] as? Int == sshPort)
                #expect(endpoint["user"] as? String == "debian")
                let viaCLI = try await runCorral(
                    [
                        "instances", "ssh", id, "-i", key, "-o", "BatchMode=yes", "-o", "UserKnownHostsFile=/dev/null", "--",
                        "cat", "/var/tmp/corral-user-data",
                    ],
                    environment: [
                        "CORRAL_POOL_URL": harness.poolURL, "CORRAL_TOKEN": harness.userToken,
                        "PATH": ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin", "HOME": harness.directory.path,
                    ])
                #expect(viaCLI.status == 0, "\(viaCLI.stderr)")
                #expect(viaCLI.stdout == ran.stdout)
                // The host's loopback services were out of the guest's reach (curl's
                // exit 7 when the connection is refused), while its SSH forward and
                // cloud-init worked.
                let host = try await shell.run("cat /var/tmp/corral-host")
                let tries = host.stdout.split(separator: "\n")
                #expect(tries.count == 2 && tries.allSatisfy { $0.hasPrefix("refused") }, "the guest's tries of the host's loopback: \(host.stdout)")
                #expect(reports.first(name) == nil, "the guest reached the image server on the host's loopback")
                // The rules match only QEMU's own connections out through loopback.
                let rules = try await runProgram("nft", ["list", "table", "inet", "corral_guests"])
                let lines = rules.stdout.split(separator: "\n").map { $0.trimmingCharacters(in: .whitespaces) }
                let matching = lines.filter { $0.contains("accept") || $0.contains("reject") }.filter { !$0.hasPrefix("type ") }
                #expect(matching.count == 4, "\(rules.stdout)")
                #expect(matching.allSatisfy { $0.hasPrefix("oifname \"lo\" meta skuid ") }, "\(rules.stdout)")

                // The launch timeline has every phase, through the API and on the agent.
                var timeline: [[String: Any]] = []
                let timelineDeadline = ContinuousClock.now + .seconds(60)
                while ContinuousClock.now < timelineDeadline {
                    timeline = try await harness.v1Data(.GET, "/v1/server-instance/\(id)/timeline")
                    if timeline.count == LaunchPhase.allCases.count { break }
                    try await Task.sleep(for: .milliseconds(500))
                }
                var seconds: [String: Double] = [:]
                var details: [String: String] = [:]
                for entry in timeline {
                    guard let phase = entry["phase"] as? String else { continue }
                    seconds[phase] = entry["seconds"] as? Double
                    details[phase] = entry["detail"] as? String
                }
                let consoleTail = ((try? String(contentsOfFile: harness.consolePath(name), encoding: .utf8)) ?? "")
                    .replacingOccurrences(of: "\r", with: "").split(separator: "\n").suffix(40).joined(separator: "\n")
                #expect(Set(seconds.keys) == Set(LaunchPhase.allCases.map(\.rawValue)), "\(timeline)\n--- console tail ---\n\(consoleTail)")
                let steps = LaunchPhase.allCases.prefix { $0 != .postCreateDone }.map { seconds[$0.rawValue] ?? -1 }
                #expect(steps == steps.sorted(), "request to running, in order: \(timeline)")
                #expect((seconds["post-create-done"] ?? -1) >= (seconds["running-reported"] ?? 0))
                #expect((seconds["ssh-reachable"] ?? -1) >= (seconds["domain-started"] ?? 0))
                #expect(details["post-create-done"]?.hasPrefix("guest uptime ") == true, "\(details)")
                #expect(details["ssh-reachable"] == "127.0.0.1 port \(sshPort)")
                let onAgent = try await runCorral(["agent", "status", "--timeline", name, "--config", harness.agentConfig.path])
                #expect(onAgent.status == 0, "\(onAgent.stderr)")
                for phase in LaunchPhase.allCases { #expect(onAgent.stdout.contains(phase.rawValue), "\(onAgent.stdout)") }

                // A guest that floods its serial console leaves at most virtlogd's
                // cap on the host (max_size 2 MiB, max_backups 3, the defaults).
                #expect(try await shell.run("touch /var/tmp/corral-flood").status == 0)
                let consoles = harness.stateDirectory + "/consoles"
                func consoleLogs() -> [String: Int] {
                    var sizes: [String: Int] = [:]
                    for file in (try? FileManager.default.contentsOfDirectory(atPath: consoles)) ?? [] where file.hasPrefix(name + ".log") {
                        sizes[file] = (try? FileManager.default.attributesOfItem(atPath: "\(consoles)/\(file)")[.size] as? Int) ?? 0
                    }
                    return sizes
                }
                let floodDeadline = ContinuousClock.now + .seconds(180)
                while consoleLogs().keys.count < 4, ContinuousClock.now < floodDeadline { try await Task.sleep(for: .seconds(1)) }
                try await Task.sleep(for: .seconds(5))
                let logs = consoleLogs()
                #expect(Set(logs.keys) == Set(["", ".0", ".1", ".2"].map { "\(name).log\($0)" }), "rotated logs: \(logs)")
                #expect(logs.values.allSatisfy { $0 <= 2 << 20 }, "each log within max_size: \(logs)")

                let domain = try #require(try await harness.domains(named: name).first)
                // Reboot: the guest boots again (a new boot id), the pool shows it running.
                let bootID = try await shell.run("cat /proc/sys/kernel/random/boot_id").stdout
                try await harness.v1(.PUT, "/v1/server-instance/\(id)", body: ["task": ["what": "reboot"]])
                var rebooted = false
                let rebootDeadline = ContinuousClock.now + .seconds(240)
                while !rebooted, ContinuousClock.now < rebootDeadline {
                    let now = try await shell.run("cat /proc/sys/kernel/random/boot_id", timeout: 15)
                    rebooted = now.status == 0 && !now.stdout.isEmpty && now.stdout != bootID
                    if !rebooted { try await Task.sleep(for: .seconds(2)) }
                }
                #expect(rebooted, "the guest booted again")
                #expect(try await domain.state().isActive)
                try await harness.waitForStatus(id, "ACTIVE")

                try await harness.v1(.PUT, "/v1/server-instance/\(id)", body: ["task": ["what": "power-off"]])
                try await harness.waitForStatus(id, "SHUTOFF", timeout: .seconds(180))
                #expect(try await domain.state().isActive == false)
                #expect(try await harness.poolInstance(name)?["state_reason"] as? String == "shut off (shutdown)")

                try await harness.v1(.PUT, "/v1/server-instance/\(id)", body: ["task": ["what": "power-on"]])
                try await harness.waitForStatus(id, "ACTIVE")
                #expect(try await domain.state().isActive)
                try await shell.waitUntilReachable(timeout: .seconds(240))
                #expect(try await shell.run("cat /var/tmp/corral-marker").status == 0, "the disk survived the power cycle")

                try await harness.v1(.DELETE, "/v1/server-instance/\(id)")
                try await harness.waitForStatus(id, "DELETED", timeout: .seconds(120))
                #expect(try await harness.poolInstance(name)?["state"] as? Int == 7)
                #expect(try await harness.domains(named: name).isEmpty)
                #expect(harness.instanceFiles().filter { $0.contains(name) }.isEmpty, "no overlay, no seed, no console logs")
            } catch {
                let console = (try? String(contentsOfFile: harness.consolePath(name), encoding: .utf8)) ?? "(no console log)"
                throw SetupError("\(error)\n--- console tail of \(name) ---\n\(console.replacingOccurrences(of: "\r", with: "").split(separator: "\n").suffix(60).joined(separator: "\n"))")
            }
        }
    }
}
