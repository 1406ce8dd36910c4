import Foundation

/// The tiny real guest for libvirt tests: Debian's cloud kernel with a
/// busybox initramfs, built by `scripts/build-test-guest` and cached. Its
/// init prints ``readyMarker`` on the serial console and powers off on an
/// ACPI power-button press.
public struct TestGuest: Sendable {
    public var kernel: String
    public var initrd: String

    public static let readyMarker = "corral-test-guest: init ready"
    /// How long a test waits for ``readyMarker``: a bound that proves the
    /// guest boots, not a speed target. It boots in seconds alone, but CI
    /// runs the guest suites in parallel under TCG, and one took over 60 s.
    public static let bootTimeout: Duration = .seconds(180)

    private actor Cache {
        var build: Task<TestGuest, any Error>?
        func get() async throws -> TestGuest {
            // One build even when several tests ask at once.
            if let build { return try await build.value }
            let task = Task { try await Self.buildGuest() }
            build = task
            return try await task.value
        }

        private static func buildGuest() async throws -> TestGuest {
            let script = Paths.packageRoot.appendingPathComponent("scripts/build-test-guest")
            let result = try await runCommand(script, [])
            guard result.status == 0 else {
                throw SetupError("scripts/build-test-guest failed (\(result.status)):\n\(result.stderr)")
            }
            var values: [String: String] = [:]
            for line in result.stdout.split(separator: "\n") {
                let parts = line.split(separator: "=", maxSplits: 1).map(String.init)
                if parts.count == 2 { values[parts[0]] = parts[1] }
            }
            guard let kernel = values["kernel"], let initrd = values["initrd"] else {
                throw SetupError("scripts/build-test-guest printed no kernel=/initrd= lines:\n\(result.stdout)")
            }
            return TestGuest(kernel: kernel, initrd: initrd)
        }
    }

    private static let cache = Cache()

    /// The guest, built on first use in this process (cached on disk).
    public static func shared() async throws -> TestGuest { try await cache.get() }

    /// A domain definition booting this guest with its serial console
    /// written to `consoleLog`.
    public func domainXML(
        name: String, virtType: String = "qemu", consoleLog: String, memoryMiB: Int = 128, vcpus: Int = 1,
        metadata: String = ""
    ) -> String {
        """
        <domain type='\(virtType)'>
          <name>\(name)</name>
          <memory unit='MiB'>\(memoryMiB)</memory>
          <vcpu>\(vcpus)</vcpu>
          \(metadata.isEmpty ? "" : "<metadata>\(metadata)</metadata>")
          <os>
            <type arch='x86_64'>hvm</type>
            <kernel>\(kernel)</kernel>
            <initrd>\(initrd)</initrd>
            <cmdline>console=ttyS0 panic=-1 no_timer_check</cmdline>
          </os>
          <features><acpi/></features>
          <on_poweroff>destroy</on_poweroff>
          <on_reboot>restart</on_reboot>
          <on_crash>destroy</on_crash>
          <devices>
            <serial type='file'>
              <source path='\(consoleLog)'/>
              <target port='0'/>
            </serial>
          </devices>
        </domain>
        """
    }
}

/// Waits until `file` contains `text` (at least `occurrences` times), or
/// throws after `timeout`.
public func waitForText(_ text: String, inFile file: String, occurrences: Int = 1, timeout: Duration) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if let contents = try? String(contentsOfFile: file, encoding: .utf8),
            contents.components(separatedBy: text).count - 1 >= occurrences
        {
            return
        }
        try await Task.sleep(for: .milliseconds(100))
    }
    let contents = (try? String(contentsOfFile: file, encoding: .utf8)) ?? "(no console output)"
    throw SetupError("'\(text)' did not appear in \(file) within \(timeout). Console:\n\(contents.suffix(2000))")
}
